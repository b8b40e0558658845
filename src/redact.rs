//! Showing URLs without the secrets they may hold, for logs and errors. Every URL that Switchyard
//! shows goes through here.

use url::{Position, Url};

/// The URL with its password (in the user info, or PostgreSQL's `password` query parameter)
/// masked; a URL that does not parse as one with a host is not shown at all.
pub fn password(url: &str) -> String {
    let mut parsed = match with_host(url) {
        Ok(parsed) => parsed,
        Err(shown) => return shown.into(),
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(key, _)| key.eq_ignore_ascii_case("password")) {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(key, value)| {
                let value = if key.eq_ignore_ascii_case("password") { "***".into() } else { value };
                (key.into_owned(), value.into_owned())
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// The URL with its user name, password, query values and fragment masked: for the URLs of
/// model APIs, some of which take the key as a query parameter (`?key=`).
pub fn everything(url: &str) -> String {
    let mut parsed = match with_host(url) {
        Ok(parsed) => parsed,
        Err(shown) => return shown.into(),
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username("***");
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        let keys: Vec<String> = parsed.query_pairs().map(|(key, _)| key.into_owned()).collect();
        parsed.query_pairs_mut().clear().extend_pairs(keys.iter().map(|key| (key.as_str(), "***")));
    }
    parsed.set_fragment(None);
    parsed.to_string()
}

/// The parsed URL, or what to show instead of a URL whose secrets cannot be found reliably.
fn with_host(url: &str) -> Result<Url, &'static str> {
    let parsed = Url::parse(url).map_err(|_| "<unparsable URL>")?;
    // Without `//` after the scheme (`amqp:user:pw@host`) the URL still parses, but as an opaque
    // path: `password()` is None and the password would be shown as it is.
    if parsed.cannot_be_a_base() || !parsed.has_authority() {
        return Err("<URL without a host>");
    }
    // A password with an unencoded `/`, `?` or `#` ends the authority early, and its rest (up to
    // the `@`) lands after the host.
    if parsed[Position::BeforePath..].contains('@') {
        return Err("<URL with an @ after its host>");
    }
    Ok(parsed)
}

//! The rule decomposer: a request's text broken into intents by the catalog's keywords.
//!
//! Simple and deterministic (see [`Catalog::decompose`]): the same text always yields the same
//! intents, and a confidence that says how much of the text the rules understood. Pure logic.

use crate::model::domain::{Decomposition, Intent, MAX_INTENTS};

use super::catalog::Catalog;

#[cfg(test)]
mod corpus;
mod reading;

/// The name [`Catalog::decompose`] puts in [`Decomposition::decomposer`].
pub const DECOMPOSER: &str = "rules";

/// Why a request's text yields no decomposition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecomposeError {
    #[error("the request text is empty")]
    Empty,
    #[error("no work type in the catalog matches the request; known work types: {known}")]
    NoMatch {
        /// The catalog's work types, comma-separated.
        known: String,
    },
    #[error(
        "the request asks for {0} things, more than the {MAX_INTENTS} one request may ask for: \
         split it into smaller requests"
    )]
    TooManyIntents(usize),
}

impl Catalog {
    /// Breaks a request's text into intents, by rules:
    ///
    /// 1. **Clauses.** The text is split on sentence ends (`.`, `!`, `?`), `,` and `;` when
    ///    followed by whitespace or the end of the text, on line breaks, and on the words
    ///    "and", "then" and "also" (case-insensitive; the conjunction itself is dropped).
    /// 2. **Work type.** Each clause gets the work type with the earliest keyword match in it;
    ///    a keyword matches case-insensitively at the start of a word ("alert" matches
    ///    "alerts", not "xalert") and may span words ("set up"). A weak keyword (a generic verb
    ///    such as "set up" or "update") counts only when no keyword of any work type is in the
    ///    clause: "Set up nightly backups" is a backup, "Set up Gitea" a deployment. Ties go to
    ///    catalog order. A matching clause is an intent of its own, unless it has the previous
    ///    intent's work type and names no entity ("Monitor the NAS and notify me on Telegram").
    /// 3. **Folding.** A clause that matches no keyword adds its text, entities and targets to
    ///    the previous intent ("Deploy Gitea and PostgreSQL"), or, before the first intent, to
    ///    the first intent.
    /// 4. **Targets.** When a clause ends in "to|on|in|into|onto [the|my|our|your] PHRASE",
    ///    PHRASE is a target if it is one to three capitalised words ("to Discord"), or one
    ///    lowercase word ("to the homelab", "to production"; without a determiner, not one that
    ///    starts with a keyword or is a common verb, as in "a script to monitor"), or two
    ///    lowercase words after a determiner ("on the staging server").
    /// 5. **Entities.** Runs of capitalised words outside the target ("Uptime Kuma"), leaving
    ///    out a clause's first word when it is a keyword or a common verb or function word
    ///    ("Deploy", "Please"), and anything that is also a target of the intent.
    /// 6. **Confidence.** The mean of the clauses' scores, rounded to three decimals. A clause
    ///    folded into an intent scores 0.5 ("Deploy Gitea and PostgreSQL": 0.75). A matching
    ///    clause scores 1, less what its reading leaves unexplained, and at least 0:
    ///    - Its *head* is its first word that is neither a lead-in ("please", "can you", "I
    ///      want to", …) nor a function word ("the", "my", "is"). When the keyword is the head
    ///      ("Restart Jellyfin"), what follows is the keyword's object, and costs only 0.1 if a
    ///      keyword of another work type is in it ("Write a *backup* script": likely a
    ///      modifier, but maybe the work). Otherwise the clause loses:
    ///      - 0.3 if the head is unexplained ("*Migrate* the backups"). A word is explained when
    ///        it is part of a keyword or weak keyword of the work type, a weak keyword of any
    ///        work type, a known entity of any work type (in any case), a function word, a
    ///        generic verb ("add", "open"), a time ("nightly") or a thing of any homelab
    ///        ("server", "database"), an entity or target (but not the clause's first word,
    ///        which is capitalised anyway), or has a digit, '.', ':' or '/' in it ("8080",
    ///        "nas.lan");
    ///      - 0.3 × the share of its words, function words aside, that are unexplained;
    ///      - 0.15 if a keyword of another work type is in it ("check the backup dashboard");
    ///      - 0.2 if a preposition comes between the head and the keyword: the keyword names a
    ///        circumstance, not the work ("Jellyfin won't start *after the upgrade*").
    ///    - 0.2 if a weak keyword decided and the clause names no entity the catalog knows
    ///      ("Set up a Minecraft server" is less sure than "Set up Uptime Kuma").
    ///
    ///    So a clear request scores 1 ("Deploy Uptime Kuma to the homelab and send alerts to
    ///    Discord": "send" is a generic verb, "Discord" a target), and a keyword met in a clause
    ///    about something else scores less.
    pub fn decompose(&self, text: &str) -> Result<Decomposition, DecomposeError> {
        if text.trim().is_empty() {
            return Err(DecomposeError::Empty);
        }
        let mut drafts: Vec<Draft> = Vec::new();
        // The sum of the clauses' scores, and their number.
        let (mut understood, mut clause_count) = (0.0, 0usize);
        // Clauses before the first intent, waiting for it.
        let mut pending: Option<Draft> = None;
        for clause in clauses(text) {
            let lower = LowerClause::new(&clause);
            let reading = self.classify(&lower);
            let matched = reading.map(|m| m.work_type);
            let starts_with_keyword = self.keyword_at_start(&lower);
            let is_verb = |w: &Word| {
                NOT_NAMES.contains(&w.lower.as_str())
                    || self.keyword_at_start(&LowerClause::of(w.lower.clone()))
            };
            let (entities, targets) = entities_and_targets(&clause, starts_with_keyword, is_verb);
            clause_count += 1;
            understood += match reading {
                Some(m) => {
                    let named: Vec<String> = entities.iter().chain(&targets).cloned().collect();
                    self.clause_score(&lower, &clause, &named, m)
                }
                None => FOLDED,
            };
            let part = Draft {
                work_type: matched.unwrap_or(usize::MAX),
                start: clause[0].start,
                end: clause[clause.len() - 1].end,
                words: clause.len(),
                entities,
                targets,
            };
            match (matched, drafts.last_mut()) {
                // "Monitor the NAS and notify me on Telegram": a clause of the same work type
                // that names nothing new continues the intent before it. One that names an
                // entity of its own ("… and deploy Nextcloud") is an intent of its own.
                (Some(m), Some(previous)) if previous.work_type == m && part.entities.is_empty() => {
                    previous.absorb_later(part)
                }
                (Some(_), _) => {
                    let mut draft = part;
                    if let Some(before) = pending.take() {
                        draft.absorb_earlier(before);
                    }
                    drafts.push(draft);
                }
                (None, Some(previous)) => previous.absorb_later(part),
                (None, None) => match &mut pending {
                    Some(before) => before.absorb_later(part),
                    None => pending = Some(part),
                },
            }
        }
        if drafts.is_empty() {
            let known: Vec<&str> = self.work_types().iter().map(|s| s.name.as_str()).collect();
            let known = if known.is_empty() { "(none)".to_owned() } else { known.join(", ") };
            return Err(DecomposeError::NoMatch { known });
        }
        if drafts.len() > MAX_INTENTS {
            return Err(DecomposeError::TooManyIntents(drafts.len()));
        }
        let intents: Vec<Intent> = drafts.into_iter().map(|d| self.intent(text, d)).collect();
        let confidence = clamp_round(understood / clause_count as f64);
        Ok(Decomposition { decomposer: DECOMPOSER.to_owned(), intents, confidence, fallback_reason: None })
    }

    fn keyword_at_start(&self, clause: &LowerClause) -> bool {
        self.work_types()
            .iter()
            .flat_map(|s| s.keywords.iter().chain(&s.weak_keywords))
            .any(|k| clause.find(k) == Some(0))
    }

    fn intent(&self, text: &str, draft: Draft) -> Intent {
        let spec = &self.work_types()[draft.work_type];
        Intent {
            work_type: spec.name.clone(),
            text: text[draft.start..draft.end].to_owned(),
            entities: draft.entities,
            targets: draft.targets,
        }
    }
}

/// The score of a clause that matched no keyword and was folded into an intent.
const FOLDED: f64 = 0.5;

fn clamp_round(value: f64) -> f64 {
    // Rounded so that stored and displayed values read 0.45, not 0.45000000000000007.
    (value.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
}

/// Words that split clauses.
const CONJUNCTIONS: [&str; 3] = ["and", "then", "also"];
/// Words that introduce a target at the end of a clause.
const PREPOSITIONS: [&str; 5] = ["to", "on", "in", "into", "onto"];
const DETERMINERS: [&str; 4] = ["the", "my", "our", "your"];
/// Lowercase words that are never a target ("send it to me").
const PRONOUNS: [&str; 7] = ["me", "us", "it", "them", "you", "him", "her"];
/// Capitalised only because they start a sentence: not the name of anything. Keywords are
/// left out too, but by matching the catalog.
const NOT_NAMES: &[&str] = &[
    "a",
    "add",
    "after",
    "allow",
    "also",
    "an",
    "and",
    "are",
    "automate",
    "before",
    "build",
    "can",
    "change",
    "check",
    "close",
    "configure",
    "could",
    "create",
    "do",
    "does",
    "enable",
    "ensure",
    "finally",
    "first",
    "fix",
    "for",
    "get",
    "help",
    "hey",
    "hi",
    "how",
    "i",
    "is",
    "it",
    "keep",
    "let",
    "let's",
    "lets",
    "make",
    "move",
    "my",
    "need",
    "next",
    "now",
    "once",
    "open",
    "our",
    "please",
    "point",
    "put",
    "run",
    "schedule",
    "send",
    "set",
    "should",
    "show",
    "start",
    "stop",
    "the",
    "then",
    "there",
    "this",
    "turn",
    "use",
    "want",
    "we",
    "what",
    "when",
    "where",
    "which",
    "who",
    "why",
    "will",
    "with",
    "would",
    "you",
    "your",
];
/// Stripped from the ends of words: quotes, brackets and punctuation, but not the '+' of "C++"
/// or the leading '.' of ".NET".
const LEADING: &[char] = &['"', '\'', '(', '[', '{', '<', '`', '*'];
const TRAILING: &[char] = &['"', '\'', ')', ']', '}', '>', '`', '*', '.', ',', ';', ':', '!', '?'];

/// A word of the request, without surrounding punctuation.
#[derive(Debug)]
struct Word<'a> {
    text: &'a str,
    lower: String,
    /// Byte range in the request's text.
    start: usize,
    end: usize,
}

impl Word<'_> {
    fn is_capitalised(&self) -> bool {
        self.text.chars().next().is_some_and(char::is_uppercase)
    }

    /// A plain lowercase word ("homelab", "staging-2").
    fn is_lowercase(&self) -> bool {
        self.text.chars().any(|c| c.is_alphabetic())
            && self.text.chars().all(|c| c.is_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
    }
}

/// Splits a request into clauses of words (see [`Catalog::decompose`]); never yields an empty
/// clause.
fn clauses(text: &str) -> Vec<Vec<Word<'_>>> {
    let mut clauses = Vec::new();
    let mut current = Vec::new();
    let tokens = tokens(text);
    for (i, &(start, end)) in tokens.iter().enumerate() {
        let raw = &text[start..end];
        let next = tokens.get(i + 1).map_or(text.len(), |t| t.0);
        let ends_clause = raw.ends_with(['.', '!', '?', ',', ';']) || text[end..next].contains('\n');
        let trimmed_start = raw.trim_start_matches(LEADING);
        let word_start = start + (raw.len() - trimmed_start.len());
        let word = trimmed_start.trim_end_matches(TRAILING);
        if word.chars().any(char::is_alphanumeric) {
            let lower = word.to_lowercase();
            if CONJUNCTIONS.contains(&lower.as_str()) {
                clauses.push(std::mem::take(&mut current));
            } else {
                current.push(Word { text: word, lower, start: word_start, end: word_start + word.len() });
            }
        }
        if ends_clause {
            clauses.push(std::mem::take(&mut current));
        }
    }
    clauses.push(current);
    clauses.retain(|c| !c.is_empty());
    clauses
}

/// Byte ranges of the whitespace-separated tokens of `text`.
fn tokens(text: &str) -> Vec<(usize, usize)> {
    let mut tokens = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                tokens.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        tokens.push((s, text.len()));
    }
    tokens
}

/// A clause lowercased and single-spaced, for keyword matching.
struct LowerClause {
    text: String,
    /// The byte position where each word starts, in order.
    starts: Vec<usize>,
}

impl LowerClause {
    fn new(words: &[Word]) -> Self {
        Self::of(words.iter().map(|w| w.lower.as_str()).collect::<Vec<_>>().join(" "))
    }

    /// `text` must be lowercase and single-spaced.
    fn of(text: String) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices(' ').map(|(i, _)| i + 1)).collect();
        Self { text, starts }
    }

    /// The index of the word at byte position `pos`.
    fn word_at(&self, pos: usize) -> usize {
        self.starts.partition_point(|&start| start <= pos).saturating_sub(1)
    }

    fn at_word_start(&self, pos: usize) -> bool {
        self.text[..pos].chars().next_back().is_none_or(|c| !c.is_alphanumeric())
    }

    /// The byte position of the first match of `keyword` (normalised) at a word start.
    fn find(&self, keyword: &str) -> Option<usize> {
        self.text.match_indices(keyword).map(|(i, _)| i).find(|&i| self.at_word_start(i))
    }

    /// The first and last word of each match of `phrase` (normalised) at a word start; with
    /// `whole`, only of those that also end a word ("Go" is not in "good", "alert" is in
    /// "alerts").
    fn matches<'a>(&'a self, phrase: &'a str, whole: bool) -> impl Iterator<Item = (usize, usize)> + 'a {
        self.text
            .match_indices(phrase)
            .map(|(i, _)| i)
            .filter(move |&i| {
                let end = i + phrase.len();
                self.at_word_start(i)
                    && (!whole || self.text[end..].chars().next().is_none_or(|c| !c.is_alphanumeric()))
            })
            .map(move |i| (self.word_at(i), self.word_at(i + phrase.len().max(1) - 1)))
    }
}

/// The entities and targets of one clause.
///
/// `is_verb` tells whether a lowercase word after a bare preposition is rather a verb ("a script
/// to monitor") than a place ("to production").
fn entities_and_targets(
    words: &[Word],
    starts_with_keyword: bool,
    is_verb: impl Fn(&Word) -> bool,
) -> (Vec<String>, Vec<String>) {
    // A condition ("… on Telegram when it is down") ends the phrase that may hold the target.
    let cut = words
        .iter()
        .skip(1)
        .position(|w| SUBORDINATORS.contains(&w.lower.as_str()))
        .map_or(words.len(), |p| p + 1);
    let (head, tail) = words.split_at(cut);
    let (target, before) = match target(head, is_verb) {
        Some((target, preposition)) => (Some(target), &head[..preposition]),
        None => (None, head),
    };
    let mut entities = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    // `None` marks the gap between the part before the target and the condition.
    let scanned = before.iter().map(Some).chain(std::iter::once(None)).chain(tail.iter().map(Some));
    for (i, word) in scanned.enumerate() {
        let Some(word) = word else {
            if !run.is_empty() {
                entities.push(run.join(" "));
                run.clear();
            }
            continue;
        };
        let not_a_name =
            (i == 0 && (starts_with_keyword || NOT_NAMES.contains(&word.lower.as_str()))) || word.text == "I";
        if word.is_capitalised() && !not_a_name {
            run.push(word.text);
        } else if !run.is_empty() {
            entities.push(run.join(" "));
            run.clear();
        }
    }
    if !run.is_empty() {
        entities.push(run.join(" "));
    }
    (entities, target.into_iter().collect())
}

/// Words that open a condition or a schedule rather than name a place.
const SUBORDINATORS: &[&str] = &["when", "whenever", "if", "unless", "once", "every", "until", "while"];

/// The target at the end of a clause and the index of the preposition introducing it.
fn target(words: &[Word], is_verb: impl Fn(&Word) -> bool) -> Option<(String, usize)> {
    if words.len() < 2 {
        return None;
    }
    let preposition =
        words[..words.len() - 1].iter().rposition(|w| PREPOSITIONS.contains(&w.lower.as_str()))?;
    let mut phrase = &words[preposition + 1..];
    let determiner = phrase.len() > 1 && DETERMINERS.contains(&phrase[0].lower.as_str());
    if determiner {
        phrase = &phrase[1..];
    }
    let join = |phrase: &[Word]| phrase.iter().map(|w| w.text).collect::<Vec<_>>().join(" ");
    if phrase.len() <= 3 && phrase.iter().all(Word::is_capitalised) {
        return Some((join(phrase), preposition));
    }
    let lowercase = phrase.iter().all(Word::is_lowercase) && !PRONOUNS.contains(&phrase[0].lower.as_str());
    let fits = match phrase.len() {
        1 => determiner || !is_verb(&phrase[0]),
        2 => determiner,
        _ => false,
    };
    (lowercase && fits).then(|| (join(phrase), preposition))
}

/// An intent being assembled from clauses.
struct Draft {
    /// Index into the catalog; meaningless for clauses waiting for an intent.
    work_type: usize,
    /// Byte range of the intent's text in the request.
    start: usize,
    end: usize,
    words: usize,
    entities: Vec<String>,
    targets: Vec<String>,
}

impl Draft {
    /// Adds the clauses that follow this one.
    fn absorb_later(&mut self, later: Draft) {
        self.end = later.end;
        self.words += later.words;
        push_new(&mut self.entities, later.entities);
        push_new(&mut self.targets, later.targets);
        self.drop_targets_from_entities();
    }

    /// Adds the clauses that precede this one.
    fn absorb_earlier(&mut self, mut earlier: Draft) {
        self.start = earlier.start;
        self.words += earlier.words;
        push_new(&mut earlier.entities, std::mem::take(&mut self.entities));
        push_new(&mut earlier.targets, std::mem::take(&mut self.targets));
        self.entities = earlier.entities;
        self.targets = earlier.targets;
        self.drop_targets_from_entities();
    }

    /// A thing named as a target in one clause is not also an entity in another.
    fn drop_targets_from_entities(&mut self) {
        let targets = &self.targets;
        self.entities.retain(|e| !targets.iter().any(|t| t.eq_ignore_ascii_case(e)));
    }
}

/// Appends the items of `new` that are not in `items` yet.
fn push_new(items: &mut Vec<String>, new: Vec<String>) {
    for item in new {
        if !items.contains(&item) {
            items.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::understanding::fixtures::*;

    const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";

    #[test]
    fn uptime_kuma_request_yields_deployment_then_monitoring() {
        let d = decompose(UPTIME_KUMA);
        assert_eq!(d.decomposer, "rules");
        assert_eq!(work_types(&d), ["deployment", "monitoring"]);
        let (deploy, monitor) = (&d.intents[0], &d.intents[1]);
        assert_eq!(deploy.text, "Deploy Uptime Kuma to the homelab");
        assert_eq!(deploy.entities, ["Uptime Kuma"]);
        assert_eq!(deploy.targets, ["homelab"]);
        assert_eq!(monitor.text, "send alerts to Discord");
        assert!(monitor.entities.is_empty(), "{:?}", monitor.entities);
        assert_eq!(monitor.targets, ["Discord"]);
        assert_eq!(d.confidence, 1.0, "every clause matched a keyword");
        assert_eq!(d.fallback_reason, None);
    }

    #[test]
    fn a_condition_does_not_hide_the_target_and_a_follow_up_clause_joins_its_intent() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Monitor the NAS and notify me on Telegram when it is down").unwrap();
        assert_eq!(work_types(&d), ["monitoring"]);
        assert_eq!(d.intents[0].entities, ["NAS"]);
        assert_eq!(d.intents[0].targets, ["Telegram"]);
    }

    #[test]
    fn clauses_without_a_keyword_fold_into_an_intent() {
        let d = decompose("For the homelab, please set up Uptime Kuma, Grafana and Prometheus.");
        assert_eq!(work_types(&d), ["deployment"]);
        let intent = &d.intents[0];
        assert_eq!(intent.text, "For the homelab, please set up Uptime Kuma, Grafana and Prometheus");
        assert_eq!(intent.entities, ["Uptime Kuma", "Grafana", "Prometheus"]);
        assert!(intent.targets.is_empty(), "'for' is no target preposition");
        let d = decompose("On my NAS, install Immich");
        assert_eq!(d.intents[0].targets, ["NAS"]);
        assert_eq!(d.intents[0].entities, ["Immich"]);
    }

    #[test]
    fn keywords_match_at_word_starts_case_insensitively() {
        assert_eq!(work_types(&decompose("SEND ALERTS")), ["monitoring"]);
        assert_eq!(work_types(&decompose("Please Set  Up Gitea")), ["deployment"]);
        assert_eq!(work_types(&decompose("a self-hosted wiki")), ["deployment"]);
        let err = Catalog::default().decompose("Stopwatch").unwrap_err();
        assert!(matches!(err, DecomposeError::NoMatch { .. }), "'watch' inside a word matched");
    }

    #[test]
    fn empty_and_unrecognised_text_are_errors() {
        let catalog = Catalog::default();
        for empty in ["", "   \n\t "] {
            let err = catalog.decompose(empty).unwrap_err();
            assert_eq!(err, DecomposeError::Empty);
            assert_eq!(err.to_string(), "the request text is empty");
        }
        let err = catalog.decompose("hello there").unwrap_err();
        assert!(matches!(err, DecomposeError::NoMatch { .. }));
        assert_eq!(
            err.to_string(),
            "no work type in the catalog matches the request; known work types: \
             deployment, code_generation, monitoring, maintenance, research, transcription, backup, \
             restore, upgrade, firewall, dns, diagnosis, dashboard"
        );
        assert!(catalog.decompose(" , and ; then .").is_err());
    }

    #[test]
    fn a_folded_clause_counts_half_in_the_confidence() {
        // "PostgreSQL" matches nothing and is folded into the deployment: it counts half.
        let d = decompose("Deploy Gitea and PostgreSQL");
        assert_eq!(d.confidence, 0.75);
        let d = decompose("Please, for the team. Deploy Gitea to the homelab");
        assert_eq!(d.confidence, 0.667, "{d:?}");
        assert_eq!(decompose(UPTIME_KUMA).confidence, 1.0);
    }

    #[test]
    fn confidence_says_how_much_of_each_clause_the_reading_explains() {
        let read = |text: &str| {
            let d = decompose(text);
            (work_types(&d).join(" "), d.confidence)
        };
        // Clear requests, whose keyword is the head or whose other words are all explained.
        assert_eq!(read("Set up nightly backups of the postgres database to S3"), ("backup".into(), 1.0));
        assert_eq!(read("Upgrade Nextcloud to the latest version"), ("upgrade".into(), 1.0));
        assert_eq!(read("build a Grafana dashboard"), ("dashboard".into(), 1.0));
        assert_eq!(read("Why is my Plex server slow?"), ("diagnosis".into(), 1.0));
        assert_eq!(read("Open port 8080 on the firewall"), ("firewall".into(), 1.0));
        assert_eq!(read("Add a DNS record in Pi-hole"), ("dns".into(), 1.0));
        // A weak keyword with nothing the catalog knows.
        assert_eq!(read("Set up a Minecraft server"), ("deployment".into(), 0.8));
        // A keyword of another work type in the object of the head.
        assert_eq!(read("Write a backup script"), ("code_generation".into(), 0.9));
        // The keyword names a circumstance; an unexplained head; unexplained words.
        assert_eq!(read("The mail relay rejects everything after the upgrade"), ("upgrade".into(), 0.275));
        assert_eq!(read("Migrate the Postgres backups to the new NAS"), ("backup".into(), 0.625));
    }

    #[test]
    fn a_reading_by_a_generic_keyword_over_another_work_type_is_not_sure() {
        // A catalog where "set up" is a keyword, not a weak one: the backups in the object of
        // "set up" say that the deployment may be a misread.
        let catalog = Catalog::from_toml_str(
            r#"
            [[work_type]]
            name = "deployment"
            keywords = ["set up"]
            base_complexity = 0.4
            [[work_type.step]]
            key = "deploy"
            description = "Deploy {entities}"
            duration_secs = 60

            [[work_type]]
            name = "maintenance"
            keywords = ["backup"]
            base_complexity = 0.4
            [[work_type.step]]
            key = "apply"
            description = "Maintain {entities}"
            duration_secs = 60
            "#,
        )
        .unwrap();
        let d = catalog.decompose("Set up nightly backups of the postgres database to S3").unwrap();
        assert_eq!(work_types(&d), ["deployment"]);
        assert_eq!(d.confidence, 0.9);
    }
}

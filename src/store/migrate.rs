//! The schema: the migrations under `migrations/`, embedded in the binary and applied by
//! [`Store::migrate`].

use super::{Error, Store};

mod embedded {
    refinery::embed_migrations!("migrations");
}

impl Store {
    /// Applies the embedded migrations. Safe to run from several processes at once: they take
    /// turns on an advisory lock.
    ///
    /// The migration's own error is the one reported, even if giving the lock back fails too;
    /// and a connection that may still hold the lock is closed, not returned to the pool, where
    /// it would keep every other process from migrating.
    pub async fn migrate(&self) -> Result<(), Error> {
        const LOCK: i64 = 0x5357_4954_4348; // "SWITCH"
        let mut client = self.pool.get().await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
        let migrated = embedded::migrations::runner().run_async(&mut **client).await.map(drop);
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await.map(drop);
        if unlocked.is_err() {
            // Out of the pool: dropped, the connection closes and the server frees its locks.
            drop(deadpool_postgres::Object::take(client));
        }
        migrated?;
        unlocked?;
        Ok(())
    }
}

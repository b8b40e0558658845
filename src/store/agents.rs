//! Registering an agent from outside its heartbeats (the command line, tests): applied as the
//! `Write::Agent` a heartbeat would be.

use chrono::Utc;

use super::{Error, Store};
use crate::model::effect::{Write, write};
use crate::model::wire::Heartbeat;

impl Store {
    /// Registers (or updates) an agent, as its heartbeat would.
    pub async fn register_agent(&self, actor: &str, heartbeat: Heartbeat) -> Result<(), Error> {
        let write = Write::Agent(write::Agent { heartbeat, received_at: Utc::now() });
        self.apply(actor, None, std::slice::from_ref(&write)).await.map(|_| ())
    }
}

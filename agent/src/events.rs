//! The event sink: what the daemon did, for whoever wants to show it.
//!
//! Producers (the startup pipeline, the supervisor, the stop sequence, the save) call
//! [`Events::emit`]; consumers (the control-plane reporter, `shutdown --wait`,
//! `save` progress, the local `/v1/events` stream) subscribe. A slow consumer loses the
//! oldest events (broadcast lag), never blocks a producer.

use agent_proto::local::{Event, EventKind, Level};
use tokio::sync::broadcast;

#[derive(Clone)]
pub struct Events {
    tx: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let (tx, _) = broadcast::channel(4096);
        Events { tx }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    pub fn emit(&self, level: Level, kind: EventKind, message: impl Into<String>) {
        let message = crate::secrets::redact(&message.into()).into_owned();
        let ev = Event {
            at: now_rfc3339(),
            level,
            message,
            kind,
        };
        let _ = self.tx.send(ev);
    }

    pub fn note(&self, level: Level, message: impl Into<String>) {
        self.emit(level, EventKind::Note, message)
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

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
    history: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Event>>>,
}

/// Events kept for late subscribers (`/v1/events?replay=true`, the reporter's start).
pub const HISTORY: usize = 512;

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        let (tx, _) = broadcast::channel(1024);
        Events {
            tx,
            history: Default::default(),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Subscribe, and get the recent history that came before (no gap, no overlap).
    pub fn subscribe_with_history(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        (h.iter().cloned().collect(), rx)
    }

    pub fn emit(&self, level: Level, kind: EventKind, message: impl Into<String>) {
        let message = crate::secrets::redact(&message.into()).into_owned();
        let ev = Event {
            at: now_rfc3339(),
            level,
            message,
            kind,
        };
        // History and broadcast under one lock, so a subscriber with history sees
        // every event exactly once.
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() >= HISTORY {
            h.pop_front();
        }
        h.push_back(ev.clone());
        let _ = self.tx.send(ev);
    }

    pub fn note(&self, level: Level, message: impl Into<String>) {
        self.emit(level, EventKind::Note, message)
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

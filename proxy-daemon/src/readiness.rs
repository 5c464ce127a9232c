//! Readiness, ztunnel-style: the daemon is ready when nothing blocks it. Startup steps hold
//! a [`BlockReady`] guard until done; conditions (every enrolled pod has its listener) are
//! set and cleared as they change.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

#[derive(Clone, Default)]
pub struct Ready(Arc<Mutex<BTreeSet<String>>>);

/// Blocks readiness until dropped.
pub struct BlockReady {
    parent: Ready,
    name: String,
}

impl Ready {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register_task(&self, name: &str) -> BlockReady {
        self.set_blocked(name, true);
        BlockReady {
            parent: self.clone(),
            name: name.to_string(),
        }
    }

    /// Marks a named condition as blocking (true) or satisfied (false).
    pub fn set_blocked(&self, name: &str, blocked: bool) {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if blocked {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    pub fn pending(&self) -> Vec<String> {
        let set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.iter().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        self.parent.set_blocked(&self.name, false);
    }
}

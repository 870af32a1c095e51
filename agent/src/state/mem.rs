//! `MemStore`: the in-memory [`Persist`] of the unit tests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{Change, Pending, Persist, PersistedState, StateError, apply};

/// Records every group submitted (`.0`, one `Vec<Change>` per successful `submit`), and
/// can be made to fail (`.1`, see [`MemStore::fail`]) as a full disk would. Starts from
/// the empty state, or from `.2` ([`MemStore::with`]).
#[derive(Clone, Default)]
pub struct MemStore(
    pub Arc<Mutex<Vec<Vec<Change>>>>,
    pub Arc<AtomicBool>,
    Arc<PersistedState>,
);

impl MemStore {
    /// A store that already holds `state`.
    pub fn with(state: PersistedState) -> Self {
        MemStore(Arc::default(), Arc::default(), Arc::new(state))
    }

    /// Makes every later `submit` fail with ENOSPC (`on`), or succeed again.
    pub fn fail(&self, on: bool) {
        self.1.store(on, Ordering::Relaxed);
    }

    /// The state every recorded group applied in order (with [`apply`]) gives.
    pub fn last(&self) -> PersistedState {
        let mut state = (*self.2).clone();
        for change in self.0.lock().unwrap().iter().flatten() {
            apply(&mut state, change);
        }
        state
    }

    /// How many groups were recorded.
    pub fn groups(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Persist for MemStore {
    fn submit(&self, changes: Vec<Change>) -> Pending {
        if self.1.load(Ordering::Relaxed) {
            return Pending::done(Err(StateError::Io {
                op: "write",
                path: "/var/lib/hypha/state.redb".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }));
        }
        self.0.lock().unwrap().push(changes);
        Pending::done(Ok(()))
    }

    fn committed(&self) -> Result<PersistedState, StateError> {
        Ok(self.last())
    }
}

//! Maps and lists that every call reads and that change rarely (a new label, agent or key).
//!
//! Why: on the per-core data plane, a `RwLock`'s read lock is an atomic write to its reader
//! count, a cache line both cores then pass back and forth on every call; an `Arc` clone out of
//! it is another. Copy-on-write behind `ArcSwap` reads without writing anything shared.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

/// A value read on every call by both workers and changed rarely (a new label): copy-on-write
/// behind `ArcSwap`, whose reads write nothing shared (a `RwLock`'s read lock is an atomic
/// write to a line both workers then pass back and forth).
pub struct ReadMostly<T> {
    current: ArcSwap<T>,
    /// Serialises the rare writers, so none loses another's change.
    write: Mutex<()>,
}

impl<T: Clone + Default> Default for ReadMostly<T> {
    fn default() -> Self {
        Self {
            current: ArcSwap::from_pointee(T::default()),
            write: Mutex::new(()),
        }
    }
}

impl<T: Clone> ReadMostly<T> {
    /// `find` in the current value; if it finds nothing, `add` to a copy, publish the copy and
    /// `find` in it (it must find then). `find` returns `Some` at most once.
    pub fn find_or_add<R>(&self, mut find: impl FnMut(&T) -> Option<R>, add: impl FnOnce(&mut T)) -> R {
        if let Some(r) = find(&self.current.load()) {
            return r;
        }
        let _writing = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = T::clone(&self.current.load());
        if let Some(r) = find(&next) {
            return r;
        }
        add(&mut next);
        let r = find(&next).expect("what was just added is found");
        self.current.store(Arc::new(next));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_adds_are_all_kept_and_each_found_once() {
        let shared: Arc<ReadMostly<Vec<u32>>> = Arc::default();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let v = (i % 50) * 4 + t;
                        let mut calls = 0;
                        let found = shared.find_or_add(
                            |list| {
                                calls += 1;
                                list.contains(&v).then_some(v)
                            },
                            |list| list.push(v),
                        );
                        assert_eq!(found, v);
                        assert!(calls <= 3);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut all = Vec::clone(&shared.current.load());
        all.sort_unstable();
        assert_eq!(all, (0..200).collect::<Vec<_>>(), "no insert lost, none twice");
    }
}

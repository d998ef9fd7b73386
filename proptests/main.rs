//! Property tests of the lock core.
//!
//! 1. A state machine: random sequences of try / timed acquisitions, upgrades,
//!    downgrades and releases over four handles (two clones of one attachment
//!    = two threads of one process, and two more attachments of the same file
//!    = two more processes) on three IDs, checked step by step against a
//!    reference model of the lock semantics, with an invariant that the
//!    table's own view (stats) matches the model after every step.
//! 2. ID-to-slot mapping: many distinct IDs held at once never share a lock.

use std::collections::HashSet;
use std::time::Duration;

use locktable::{HoldMode, LockTable, ReadGuard, TableOptions, UpgradableReadGuard, WriteGuard};
use proptest::prelude::*;
use proptest_state_machine::{prop_state_machine, ReferenceStateMachine, StateMachineTest};

const HANDLES: usize = 4;
const IDS: usize = 3;
const ID_NAMES: [&str; IDS] = ["alpha", "beta", "gamma"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Read,
    Upgradable,
    Write,
}

#[derive(Debug, Clone, Copy)]
enum Wait {
    Try,
    Timeout,
}

#[derive(Debug, Clone)]
enum Step {
    Acquire {
        handle: usize,
        id: usize,
        mode: Mode,
        wait: Wait,
    },
    Upgrade {
        hold: usize,
        wait: Wait,
    },
    Downgrade {
        hold: usize,
    },
    DowngradeToUpgradable {
        hold: usize,
    },
    Release {
        hold: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    handle: usize,
    id: usize,
    mode: Mode,
}

/// The reference: the list of holds, and whether the last step succeeded.
#[derive(Debug, Clone, Default)]
struct Model {
    held: Vec<Held>,
    last_ok: bool,
}

impl Model {
    fn readers(&self, id: usize) -> usize {
        self.held
            .iter()
            .filter(|h| h.id == id && h.mode == Mode::Read)
            .count()
    }
    fn has(&self, id: usize, mode: Mode) -> bool {
        self.held.iter().any(|h| h.id == id && h.mode == mode)
    }
    fn grantable(&self, id: usize, mode: Mode) -> bool {
        let writer = self.has(id, Mode::Write);
        let upgrader = self.has(id, Mode::Upgradable);
        match mode {
            Mode::Read => !writer,
            Mode::Upgradable => !writer && !upgrader,
            Mode::Write => !writer && !upgrader && self.readers(id) == 0,
        }
    }
}

fn wait_strategy() -> impl Strategy<Value = Wait> {
    prop_oneof![3 => Just(Wait::Try), 1 => Just(Wait::Timeout)]
}

struct LockModel;

impl ReferenceStateMachine for LockModel {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Step> {
        let mode = prop_oneof![Just(Mode::Read), Just(Mode::Upgradable), Just(Mode::Write)];
        let acquire =
            (0..HANDLES, 0..IDS, mode, wait_strategy()).prop_map(|(handle, id, mode, wait)| {
                Step::Acquire {
                    handle,
                    id,
                    mode,
                    wait,
                }
            });
        if state.held.is_empty() {
            return acquire.boxed();
        }
        let n = state.held.len();
        prop_oneof![
            3 => acquire,
            2 => (0..n).prop_map(|hold| Step::Release { hold }),
            1 => (0..n, wait_strategy()).prop_map(|(hold, wait)| Step::Upgrade { hold, wait }),
            1 => (0..n).prop_map(|hold| Step::Downgrade { hold }),
            1 => (0..n).prop_map(|hold| Step::DowngradeToUpgradable { hold }),
        ]
        .boxed()
    }

    fn preconditions(state: &Model, step: &Step) -> bool {
        let mode_of = |i: usize| state.held.get(i).map(|h| h.mode);
        match *step {
            Step::Acquire { .. } => true,
            Step::Release { hold } => hold < state.held.len(),
            Step::Upgrade { hold, .. } => mode_of(hold) == Some(Mode::Upgradable),
            Step::Downgrade { hold } => {
                matches!(mode_of(hold), Some(Mode::Write | Mode::Upgradable))
            }
            Step::DowngradeToUpgradable { hold } => mode_of(hold) == Some(Mode::Write),
        }
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        state.last_ok = true;
        match *step {
            Step::Acquire {
                handle, id, mode, ..
            } => {
                state.last_ok = state.grantable(id, mode);
                if state.last_ok {
                    state.held.push(Held { handle, id, mode });
                }
            }
            Step::Release { hold } => {
                state.held.remove(hold);
            }
            Step::Upgrade { hold, .. } => {
                state.last_ok = state.readers(state.held[hold].id) == 0;
                if state.last_ok {
                    state.held[hold].mode = Mode::Write;
                }
            }
            Step::Downgrade { hold } => state.held[hold].mode = Mode::Read,
            Step::DowngradeToUpgradable { hold } => state.held[hold].mode = Mode::Upgradable,
        }
        state
    }
}

/// A held guard. Read guards are only held and dropped (their field is
/// the hold itself).
enum Guard {
    #[allow(dead_code)]
    Read(ReadGuard<'static>),
    Upgradable(UpgradableReadGuard<'static>),
    Write(WriteGuard<'static>),
}

struct Sut {
    _dir: tempfile::TempDir,
    handles: Vec<LockTable>,
    guards: Vec<Guard>,
}

const SHORT: Duration = Duration::from_millis(2);

struct LockTest;

impl StateMachineTest for LockTest {
    type SystemUnderTest = Sut;
    type Reference = LockModel;

    fn init_test(_: &Model) -> Sut {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("table");
        let opts = TableOptions::default().capacity(64).max_processes(4);
        let p0 = LockTable::open(&path, &opts).unwrap();
        let p1 = LockTable::open(&path, &opts).unwrap();
        let p2 = LockTable::open(&path, &opts).unwrap();
        Sut {
            _dir: dir,
            handles: vec![p0.clone(), p0, p1, p2],
            guards: Vec::new(),
        }
    }

    fn apply(mut sut: Sut, model: &Model, step: Step) -> Sut {
        let ok = match step {
            Step::Acquire {
                handle,
                id,
                mode,
                wait,
            } => {
                let got = acquire(&sut.handles[handle], ID_NAMES[id], mode, wait);
                let ok = got.is_some();
                sut.guards.extend(got);
                ok
            }
            Step::Release { hold } => {
                sut.guards.remove(hold);
                true
            }
            Step::Upgrade { hold, wait } => {
                let Guard::Upgradable(g) = sut.guards.remove(hold) else {
                    panic!("model and SUT disagree on the mode of hold {hold}");
                };
                let r = match wait {
                    Wait::Try => g.try_upgrade(),
                    Wait::Timeout => g.upgrade_timeout(SHORT),
                };
                let (ok, back) = match r {
                    Ok(w) => (true, Guard::Write(w)),
                    Err(u) => (false, Guard::Upgradable(u)),
                };
                sut.guards.insert(hold, back);
                ok
            }
            Step::Downgrade { hold } => {
                let g = match sut.guards.remove(hold) {
                    Guard::Write(w) => w.downgrade(),
                    Guard::Upgradable(u) => u.downgrade(),
                    Guard::Read(_) => panic!("downgrade of a read hold"),
                };
                sut.guards.insert(hold, Guard::Read(g));
                true
            }
            Step::DowngradeToUpgradable { hold } => {
                let Guard::Write(w) = sut.guards.remove(hold) else {
                    panic!("model and SUT disagree on the mode of hold {hold}");
                };
                sut.guards
                    .insert(hold, Guard::Upgradable(w.downgrade_to_upgradable()));
                true
            }
        };
        assert_eq!(ok, model.last_ok, "outcome differs from the model");
        sut
    }

    fn check_invariants(sut: &Sut, model: &Model) {
        let stats = sut.handles[0].stats().unwrap();
        let count = |m: HoldMode| -> u32 {
            stats
                .holders
                .iter()
                .filter(|h| h.mode == m)
                .map(|h| h.count)
                .sum()
        };
        let expect = |m: Mode| model.held.iter().filter(|h| h.mode == m).count() as u32;
        assert_eq!(count(HoldMode::Read), expect(Mode::Read), "read holds");
        assert_eq!(
            count(HoldMode::Upgradable),
            expect(Mode::Upgradable),
            "upgradable holds"
        );
        assert_eq!(count(HoldMode::Write), expect(Mode::Write), "write holds");
        assert_eq!(
            count(HoldMode::WritePending),
            0,
            "a pending writer was left behind"
        );
        assert!(stats.waiters.is_empty(), "a waiter mark was left behind");
        assert_eq!(sut.guards.len(), model.held.len());
    }
}

/// The SUT keeps guards beside the handles, so they are owned guards.
fn acquire(t: &LockTable, name: &str, mode: Mode, wait: Wait) -> Option<Guard> {
    let read = |g: ReadGuard<'_>| Guard::Read(g.into_owned());
    let upgradable = |g: UpgradableReadGuard<'_>| Guard::Upgradable(g.into_owned());
    let write = |g: WriteGuard<'_>| Guard::Write(g.into_owned());
    match (mode, wait) {
        (Mode::Read, Wait::Try) => t.try_read(name).unwrap().map(read),
        (Mode::Read, Wait::Timeout) => timed(t.read_timeout(name, SHORT)).map(read),
        (Mode::Upgradable, Wait::Try) => t.try_upgradable_read(name).unwrap().map(upgradable),
        (Mode::Upgradable, Wait::Timeout) => {
            timed(t.upgradable_read_timeout(name, SHORT)).map(upgradable)
        }
        (Mode::Write, Wait::Try) => t.try_write(name).unwrap().map(write),
        (Mode::Write, Wait::Timeout) => timed(t.write_timeout(name, SHORT)).map(write),
    }
}

/// A timed acquisition that the model says fails must fail with Timeout.
fn timed<G>(r: locktable::Result<G>) -> Option<G> {
    match r {
        Ok(g) => Some(g),
        Err(locktable::Error::Timeout) => None,
        Err(e) => panic!("unexpected error {e}"),
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]
    #[test]
    fn lock_semantics_match_the_model(sequential 1..40 => LockTest);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Distinct IDs held at once never share a lock, and come back free.
    #[test]
    fn distinct_ids_never_share_a_lock(
        ids in proptest::collection::hash_set(proptest::collection::vec(any::<u8>(), 1..=256), 1..300)
    ) {
        let t = LockTable::anonymous(&TableOptions::default().capacity(1024)).unwrap();
        let ids: Vec<Vec<u8>> = ids.into_iter().collect();
        let guards: Vec<_> = ids.iter().map(|id| t.try_write(id).unwrap().expect("free")).collect();
        for id in &ids {
            prop_assert!(t.try_read(id).unwrap().is_none());
        }
        let stats = t.stats().unwrap();
        let slots: HashSet<u32> = stats.holders.iter().map(|h| h.slot).collect();
        prop_assert_eq!(slots.len(), ids.len());
        drop(guards);
        for id in &ids {
            prop_assert!(t.try_write(id).unwrap().is_some());
        }
        prop_assert!(t.stats().unwrap().holders.is_empty());
    }
}

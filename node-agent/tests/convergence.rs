//! Executing `plan` through a hypervisor converges the domain to the record, for a table of
//! scenarios, on both the libvirt test driver and the in-memory fake.
//!
//! Each scenario runs the agent's loop in miniature: observe, plan, apply, with a simulated clock
//! for the shutdown timeout, for a few rounds; then the domain must be as the record says, the
//! last plan empty, and the domains that are not Karri's, or are another node's (a second agent
//! on the same host), untouched. The orphan sweep, run the same way, removes this node's orphans
//! and nothing of another node's.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    spec, spec_for, test_driver, test_driver_for, uid, xml, BUILTIN_DOMAIN, NODE, OTHER_NODE,
};
use node_agent::hypervisor::{apply_plan, FakeHypervisor, Hypervisor};
use node_agent::plan::{plan, Action, Desired, DomainState, Power};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Simulated time between two rounds of the loop.
const TICK: Duration = Duration::from_secs(25);
const ROUNDS: usize = 6;

/// The domain before the loop starts.
#[derive(Clone, Copy, Debug)]
enum Before {
    Nothing,
    /// The record's own domain, running or not.
    Own {
        running: bool,
    },
    /// A domain of the same name left by an earlier record (another UID).
    Stale {
        running: bool,
    },
}

/// The domain the loop must end with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum After {
    Absent,
    Own(DomainState),
}

struct Scenario {
    tag: &'static str,
    before: Before,
    record: Option<Power>,
    after: After,
    /// Actions expected in the first round.
    first: &'static [Action],
}

/// Runs the loop and returns the actions of each round that had any.
async fn converge<H: Hypervisor>(hv: &H, s: &Scenario, n: u16) -> Vec<Vec<Action>> {
    let spec = spec(s.tag, &uid(n, 1));
    let name = spec.name.clone();
    let record_xml = xml(&spec);

    let setup = |running: bool, uid_variant: u16| {
        let old = common::spec(s.tag, &uid(n, uid_variant));
        let actions = if running {
            vec![Action::Define, Action::Start]
        } else {
            vec![Action::Define]
        };
        (xml(&old), actions)
    };
    match s.before {
        Before::Nothing => {}
        Before::Own { running } | Before::Stale { running } => {
            let variant = if matches!(s.before, Before::Own { .. }) {
                1
            } else {
                2
            };
            let (old_xml, actions) = setup(running, variant);
            apply_plan(hv, &name, Some(&old_xml), &actions)
                .await
                .expect("sets up the domain");
        }
    }

    let desired = s.record.map(|power| Desired {
        uid: spec.uid.clone(),
        power,
        shutdown_timeout: TIMEOUT,
        reboot: false,
    });
    let mut now = Duration::ZERO;
    let mut shutdown_asked: Option<Duration> = None;
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let observed = hv
            .observe(&name)
            .await
            .expect("observes")
            .map(|d| d.observed(shutdown_asked.map(|t| now - t)));
        let actions = plan(desired.as_ref(), observed.as_ref());
        if actions.contains(&Action::Shutdown) {
            shutdown_asked = Some(now);
        }
        if actions
            .iter()
            .any(|a| matches!(a, Action::Destroy | Action::Start))
        {
            shutdown_asked = None;
        }
        apply_plan(hv, &name, Some(&record_xml), &actions)
            .await
            .expect("applies the plan");
        if !actions.is_empty() {
            rounds.push(actions);
        }
        now += TICK;
    }

    let observed = hv.observe(&name).await.expect("observes");
    let after = match &observed {
        None => After::Absent,
        Some(d) => {
            assert_eq!(d.uid, spec.uid, "{}: the domain is the record's", s.tag);
            assert!(d.defined, "{}: the record's domain is persistent", s.tag);
            After::Own(d.state)
        }
    };
    assert_eq!(after, s.after, "{}: rounds {rounds:?}", s.tag);
    let last = plan(
        desired.as_ref(),
        observed.map(|d| d.observed(None)).as_ref(),
    );
    assert_eq!(last, [], "{}: converged", s.tag);
    assert_eq!(
        rounds.first().map(Vec::as_slice).unwrap_or_default(),
        s.first,
        "{}: first round",
        s.tag
    );
    rounds
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        tag: "c01",
        before: Before::Nothing,
        record: Some(Power::Running),
        after: After::Own(DomainState::Running),
        first: &[Action::Define, Action::Start],
    },
    Scenario {
        tag: "c02",
        before: Before::Nothing,
        record: Some(Power::Stopped),
        after: After::Own(DomainState::ShutOff),
        first: &[Action::Define],
    },
    Scenario {
        tag: "c03",
        before: Before::Own { running: false },
        record: Some(Power::Running),
        after: After::Own(DomainState::Running),
        // Defined afresh from the record before it starts.
        first: &[Action::Define, Action::Start],
    },
    Scenario {
        tag: "c04",
        before: Before::Own { running: true },
        record: Some(Power::Stopped),
        after: After::Own(DomainState::ShutOff),
        first: &[Action::Shutdown],
    },
    Scenario {
        tag: "c05",
        before: Before::Own { running: true },
        record: None,
        after: After::Absent,
        first: &[Action::Destroy, Action::Undefine],
    },
    Scenario {
        tag: "c06",
        before: Before::Own { running: false },
        record: None,
        after: After::Absent,
        first: &[Action::Undefine],
    },
    Scenario {
        tag: "c07",
        before: Before::Stale { running: true },
        record: Some(Power::Running),
        after: After::Own(DomainState::Running),
        first: &[
            Action::Destroy,
            Action::Undefine,
            Action::Define,
            Action::Start,
        ],
    },
    Scenario {
        tag: "c08",
        before: Before::Stale { running: false },
        record: Some(Power::Stopped),
        after: After::Own(DomainState::ShutOff),
        first: &[Action::Undefine, Action::Define],
    },
    Scenario {
        tag: "c11",
        before: Before::Stale { running: true },
        record: Some(Power::Stopped),
        after: After::Own(DomainState::ShutOff),
        first: &[Action::Destroy, Action::Undefine, Action::Define],
    },
    Scenario {
        tag: "c09",
        before: Before::Own { running: true },
        record: Some(Power::Running),
        after: After::Own(DomainState::Running),
        first: &[],
    },
    Scenario {
        tag: "c10",
        before: Before::Nothing,
        record: None,
        after: After::Absent,
        first: &[],
    },
];

fn scenario(tag: &str) -> (u16, &'static Scenario) {
    let n = SCENARIOS
        .iter()
        .position(|s| s.tag == tag)
        .expect("scenario exists");
    (100 + n as u16, &SCENARIOS[n])
}

/// Defines and starts, through `other` (the hypervisor of `node`, another node on the same
/// host), a domain of that node for test `n`; returns its name.
async fn other_nodes_domain<H: Hypervisor>(other: &H, node: &str, tag: &str, n: u16) -> String {
    let theirs = spec_for(node, &format!("e{tag}"), &uid(n, 9));
    apply_plan(
        other,
        &theirs.name,
        Some(&xml(&theirs)),
        &[Action::Define, Action::Start],
    )
    .await
    .expect("the other node sets up its domain");
    theirs.name
}

/// `(state, id)` of `name` as its own node's hypervisor `other` sees it.
async fn seen_by<H: Hypervisor>(other: &H, name: &str) -> Option<(DomainState, Option<u32>)> {
    other
        .observe(name)
        .await
        .expect("the other node observes its domain")
        .map(|d| (d.state, d.id))
}

/// One test per scenario per hypervisor. Each also runs a domain of another node on the same
/// host, which must stay running with the same ID and never be listed; the libvirt tests also
/// check that the test driver's built-in domain (not Karri's) is still running with the same ID
/// afterwards, the fake ones that a foreign domain was never even asked about.
macro_rules! scenarios {
    ($($test:ident => $tag:literal,)*) => {
        mod libvirt {
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    let hv = test_driver().await;
                    let other = test_driver_for(OTHER_NODE).await;
                    let raw = virt::connect::Connect::open(Some(common::TEST_URI))
                        .expect("opens");
                    let builtin = raw
                        .lookup_domain_by_name(BUILTIN_DOMAIN)
                        .map(|d| d.id())
                        .expect("the test driver has its built-in domain");
                    let (n, s) = scenario($tag);
                    let theirs = other_nodes_domain(&other, OTHER_NODE, s.tag, n).await;
                    let before = seen_by(&other, &theirs).await;
                    converge(&hv, s, n).await;
                    let after = raw
                        .lookup_domain_by_name(BUILTIN_DOMAIN)
                        .map(|d| d.id())
                        .expect("the built-in domain is still there");
                    assert_eq!(after, builtin, "the built-in domain was not restarted");
                    assert_eq!(seen_by(&other, &theirs).await, before);
                    let listed = hv.list_ours().await.expect("lists");
                    assert!(listed.iter().all(|d| d.name != theirs), "{listed:?}");
                }
            )*
        }
        mod fake {
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    let hv = FakeHypervisor::new(NODE);
                    let other = hv.on_same_host(OTHER_NODE);
                    hv.insert_foreign("not-karris", DomainState::Running);
                    let before = hv.peek("not-karris");
                    let (n, s) = scenario($tag);
                    let theirs = other_nodes_domain(&other, OTHER_NODE, s.tag, n).await;
                    let theirs_before = hv.peek(&theirs);
                    converge(&hv, s, n).await;
                    assert_eq!(hv.peek("not-karris"), before);
                    assert_eq!(hv.peek(&theirs), theirs_before);
                    assert!(hv
                        .calls()
                        .iter()
                        .all(|(_, name)| name != "not-karris" && *name != theirs));
                    let listed = hv.list_ours().await.expect("lists");
                    assert!(listed.iter().all(|d| d.name != theirs), "{listed:?}");
                }
            )*
        }
    };
}

scenarios! {
    running_instance_without_domain_ends_running => "c01",
    stopped_instance_without_domain_ends_defined_and_shut_off => "c02",
    running_instance_with_shut_off_domain_ends_running => "c03",
    stopped_instance_with_running_domain_ends_shut_off => "c04",
    deleted_instance_with_running_domain_ends_without_domain => "c05",
    deleted_instance_with_shut_off_domain_ends_without_domain => "c06",
    running_instance_with_stale_running_domain_ends_running_as_itself => "c07",
    stopped_instance_with_stale_shut_off_domain_ends_shut_off_as_itself => "c08",
    stopped_instance_with_stale_running_domain_ends_shut_off_as_itself => "c11",
    running_instance_with_running_domain_is_left_alone => "c09",
    no_instance_and_no_domain_stays_empty => "c10",
}

#[tokio::test]
async fn guest_that_ignores_shutdown_is_destroyed_once_the_timeout_passes() {
    let hv = FakeHypervisor::new(NODE);
    hv.set_guests_ignore_shutdown(true);
    let s = Scenario {
        tag: "t01",
        before: Before::Own { running: true },
        record: Some(Power::Stopped),
        after: After::Own(DomainState::ShutOff),
        first: &[Action::Shutdown],
    };
    let rounds = converge(&hv, &s, 200).await;
    // Shutdown at t=0; waiting at 25 s and 50 s; destroyed at 75 s ≥ 60 s.
    assert_eq!(rounds, [vec![Action::Shutdown], vec![Action::Destroy]]);
    let name = spec("t01", &uid(200, 1)).name;
    let calls: Vec<Action> = hv
        .calls()
        .into_iter()
        .filter(|(_, n)| *n == name)
        .map(|(a, _)| a)
        .collect();
    assert_eq!(
        calls,
        [
            Action::Define,
            Action::Start,
            Action::Shutdown,
            Action::Destroy
        ]
    );
}

#[tokio::test]
async fn crashed_domain_of_a_running_instance_is_restarted() {
    let hv = FakeHypervisor::new(NODE);
    let spec = spec("t02", &uid(201, 1));
    apply_plan(
        &hv,
        &spec.name,
        Some(&xml(&spec)),
        &[Action::Define, Action::Start],
    )
    .await
    .expect("sets up");
    hv.set_state(&spec.name, DomainState::Crashed);
    let desired = Desired {
        uid: spec.uid.clone(),
        power: Power::Running,
        shutdown_timeout: TIMEOUT,
        reboot: false,
    };
    let observed = hv
        .observe(&spec.name)
        .await
        .expect("observes")
        .map(|d| d.observed(None));
    let actions = plan(Some(&desired), observed.as_ref());
    assert_eq!(actions, [Action::Destroy, Action::Define, Action::Start]);
    apply_plan(&hv, &spec.name, Some(&xml(&spec)), &actions)
        .await
        .expect("applies");
    let seen = hv.observe(&spec.name).await.expect("observes");
    assert_eq!(seen.map(|d| d.state), Some(DomainState::Running));
}

#[tokio::test]
async fn plan_that_defines_without_the_domains_xml_is_refused() {
    let hv = FakeHypervisor::new(NODE);
    let spec = spec("t03", &uid(202, 1));
    let other = common::spec("t04", &uid(202, 2));
    for xml in [None, Some(xml(&other))] {
        let result = apply_plan(&hv, &spec.name, xml.as_deref(), &[Action::Define]).await;
        assert!(
            matches!(
                result,
                Err(node_agent::hypervisor::HypervisorError::NoDefinition { .. })
            ),
            "{result:?}"
        );
    }
    assert_eq!(hv.calls(), []);
}

/// The parts of the agent's orphan sweep that decide what it may touch, in miniature (the
/// agent's own sweep is driven in `agent.rs`): every domain `list_ours` reports whose UID is not
/// live is removed by the plan for a domain without a record. Returns the names removed.
async fn sweep<H: Hypervisor>(hv: &H, live: &HashSet<String>) -> Vec<String> {
    let mut removed = Vec::new();
    for orphan in hv.list_ours().await.expect("lists") {
        if live.contains(&orphan.uid) {
            continue;
        }
        let actions = plan(None, Some(&orphan.observed(None)));
        apply_plan(hv, &orphan.name, None, &actions)
            .await
            .expect("removes the orphan");
        removed.push(orphan.name);
    }
    removed
}

/// This node (`mine`) has an orphan (running) and a live domain; another node (`theirs`) on the
/// same host has a running domain and a shut-off one whose records this node does not know (to
/// this node they would look orphaned). The sweep removes this node's orphan only.
///
/// The nodes are the test's own: a sweep removes every domain of its node that it does not
/// know, including those of other tests sharing the test driver (`cargo test`).
async fn sweep_leaves_the_other_nodes_domains<H: Hypervisor, O: Hypervisor>(
    (hv, mine): (&H, &str),
    (other, theirs): (&O, &str),
    n: u16,
) {
    let orphan = spec_for(mine, "s1", &uid(n, 1));
    let live = spec_for(mine, "s2", &uid(n, 2));
    for mine in [&orphan, &live] {
        apply_plan(
            hv,
            &mine.name,
            Some(&xml(mine)),
            &[Action::Define, Action::Start],
        )
        .await
        .expect("sets up this node's domain");
    }
    let running = other_nodes_domain(other, theirs, "s3", n).await;
    let shut_off = spec_for(theirs, "es4", &uid(n, 4));
    apply_plan(
        other,
        &shut_off.name,
        Some(&xml(&shut_off)),
        &[Action::Define],
    )
    .await
    .expect("the other node defines");
    let before = (
        seen_by(other, &running).await,
        seen_by(other, &shut_off.name).await,
    );
    assert_eq!(before.0.map(|(state, _)| state), Some(DomainState::Running));
    assert_eq!(before.1.map(|(state, _)| state), Some(DomainState::ShutOff));

    let removed = sweep(hv, &HashSet::from([live.uid.clone()])).await;
    assert_eq!(removed, std::slice::from_ref(&orphan.name));
    assert_eq!(hv.observe(&orphan.name).await.expect("observes"), None);
    assert_eq!(
        hv.observe(&live.name)
            .await
            .expect("observes")
            .map(|d| d.state),
        Some(DomainState::Running)
    );
    let after = (
        seen_by(other, &running).await,
        seen_by(other, &shut_off.name).await,
    );
    assert_eq!(after, before, "the other node's domains are untouched");
    // A second sweep finds nothing more.
    assert_eq!(
        sweep(hv, &HashSet::from([live.uid.clone()])).await,
        [] as [String; 0]
    );
    // The other node's own sweep, knowing none of its records, removes exactly its two.
    let mut removed = sweep(other, &HashSet::new()).await;
    removed.sort();
    let mut expected = vec![running, shut_off.name];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(hv.observe(&live.name).await.expect("observes").is_some());
    hv.destroy(&live.name).await.expect("destroys");
    hv.undefine(&live.name).await.expect("undefines");
}

#[tokio::test]
async fn list_ours_on_the_fake_limits_an_orphan_sweep_to_this_nodes_domains() {
    let hv = FakeHypervisor::new(NODE);
    let other = hv.on_same_host(OTHER_NODE);
    sweep_leaves_the_other_nodes_domains((&hv, NODE), (&other, OTHER_NODE), 300).await;
}

#[tokio::test]
async fn list_ours_on_the_test_driver_limits_an_orphan_sweep_to_this_nodes_domains() {
    let (mine, theirs) = ("sweeper-1", "sweeper-2");
    let hv = test_driver_for(mine).await;
    let other = test_driver_for(theirs).await;
    sweep_leaves_the_other_nodes_domains((&hv, mine), (&other, theirs), 301).await;
}

/// A record whose domain name is held by another node's domain: this node's plan cannot even
/// observe it (NotOurs), and defining over it is refused; the other node's domain keeps running.
async fn name_held_by_another_node<H: Hypervisor, O: Hypervisor>(hv: &H, other: &O, n: u16) {
    let theirs = other_nodes_domain(other, OTHER_NODE, "h1", n).await;
    let before = seen_by(other, &theirs).await;
    let mine = spec("eh1", &uid(n, 9));
    assert_eq!(mine.name, theirs, "same record, same name, other node");
    let observed = hv.observe(&mine.name).await;
    assert!(
        matches!(
            observed,
            Err(node_agent::hypervisor::HypervisorError::NotOurs { .. })
        ),
        "{observed:?}"
    );
    let result = apply_plan(
        hv,
        &mine.name,
        Some(&xml(&mine)),
        &[Action::Define, Action::Start],
    )
    .await;
    assert!(
        matches!(
            result,
            Err(node_agent::hypervisor::HypervisorError::Conflict { .. })
        ),
        "{result:?}"
    );
    assert_eq!(seen_by(other, &theirs).await, before);
    other.destroy(&theirs).await.expect("destroys");
    other.undefine(&theirs).await.expect("undefines");
}

#[tokio::test]
async fn record_named_like_another_nodes_domain_never_touches_it_on_the_fake() {
    let hv = FakeHypervisor::new(NODE);
    let other = hv.on_same_host(OTHER_NODE);
    name_held_by_another_node(&hv, &other, 302).await;
    assert_eq!(
        hv.calls()
            .iter()
            .map(|(action, _)| *action)
            .collect::<Vec<_>>(),
        [Action::Define],
        "refused at define, nothing after"
    );
}

#[tokio::test]
async fn record_named_like_another_nodes_domain_never_touches_it_on_the_test_driver() {
    let hv = test_driver().await;
    let other = test_driver_for(OTHER_NODE).await;
    name_held_by_another_node(&hv, &other, 303).await;
}

/// A domain shut down (its guest obeyed the power button) is seen as shut down; a destroyed
/// one is not: what tells a guest that powered itself off from one the agent powered off.
async fn shut_down_is_told_from_destroyed<H: Hypervisor>(hv: &H, tag: &str, n: u16) {
    let spec = spec(tag, &uid(n, 1));
    let seen = || async {
        hv.observe(&spec.name)
            .await
            .expect("observes")
            .map(|d| (d.state, d.shut_down))
    };
    let up = [Action::Define, Action::Start];
    apply_plan(hv, &spec.name, Some(&xml(&spec)), &up)
        .await
        .expect("starts");
    assert_eq!(seen().await, Some((DomainState::Running, false)));
    apply_plan(hv, &spec.name, None, &[Action::Shutdown])
        .await
        .expect("shuts down");
    assert_eq!(seen().await, Some((DomainState::ShutOff, true)));
    apply_plan(hv, &spec.name, Some(&xml(&spec)), &up)
        .await
        .expect("starts again");
    apply_plan(hv, &spec.name, None, &[Action::Destroy])
        .await
        .expect("destroys");
    assert_eq!(seen().await, Some((DomainState::ShutOff, false)));
}

#[tokio::test]
async fn a_shut_down_domain_is_told_from_a_destroyed_one_on_the_fake() {
    shut_down_is_told_from_destroyed(&FakeHypervisor::new(NODE), "t40", 240).await;
}

#[tokio::test]
async fn a_shut_down_domain_is_told_from_a_destroyed_one_on_the_test_driver() {
    shut_down_is_told_from_destroyed(&test_driver().await, "t41", 241).await;
}

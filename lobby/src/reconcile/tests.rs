//! The core driven by event sequences: every behaviour the namespace tests
//! show end to end, decided here without a kernel.
use std::path::Path;

use super::*;

const TWO_CHECKED: &str = "
lb:
  - engine: nftables
    targets:
      - name: web
        protocol: tcp
        port: 8081
        upstream_group:
          name: pool
          distribution: round-robin
          upstreams:
            - name: web1
              host: 198.18.1.11
              port: 9000
              health_check:
                protocol: tcp
                port: 9000
                start_available: false
                probe: { check_interval: 1, timeout: 1, success_count: 1 }
            - name: web2
              host: 198.18.1.12
              port: 9000
              health_check:
                protocol: tcp
                port: 9000
                start_available: true
                probe: { check_interval: 1, timeout: 1, success_count: 1 }
";

const NAMED: &str = "
lb:
  - engine: nftables
    targets:
      - name: web
        protocol: tcp
        port: 8081
        upstream_group:
          name: pool
          distribution: round-robin
          upstreams:
            - name: web1
              host: web1.example.test
              port: 9000
              health_check:
                protocol: tcp
                port: 9000
                start_available: false
                probe: { check_interval: 1, timeout: 1, success_count: 1 }
";

fn config(yaml: &str) -> Config {
    config::parse(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn id(name: &str) -> UpstreamId {
    UpstreamId::new("web", name)
}

/// A report on the one address of upstream `web{N}`: 198.18.1.1N.
fn report(name: &str, available: bool) -> Event {
    let host: u8 = name.trim_start_matches("web").parse().expect("webN");
    report_at(name, socket(10 + host).ip(), available)
}

fn report_at(name: &str, address: IpAddr, available: bool) -> Event {
    Event::Health(HealthReport {
        id: id(name),
        address: Some(address),
        available,
        reason: if available {
            "connected"
        } else {
            "connect refused"
        }
        .to_owned(),
        run: 1,
        threshold: 1,
        decided_at: tokio::time::Instant::now(),
    })
}

fn socket(host: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 1, host], 9000))
}

/// A core and a clock it is told about.
struct Harness {
    core: Core,
    now: Instant,
    /// The number of the next read of the file, as the daemon counts them.
    next_read: u64,
}

impl Harness {
    fn new(inherited: Option<Rotation>) -> Self {
        Self {
            core: Core::new(inherited, true),
            now: Instant::now(),
            next_read: 0,
        }
    }

    /// The file read, valid: `yaml`; at start, then a reload.
    fn read(&mut self, yaml: &str) -> Vec<Action> {
        let read = self.take_read();
        self.step(Event::ConfigLoaded {
            config: config(yaml),
            read,
        })
    }

    /// The file read again, invalid: `errors` say why.
    fn refused(&mut self, errors: &str) -> Vec<Action> {
        let read = self.take_read();
        self.step(Event::ConfigRejected {
            errors: errors.to_owned(),
            read,
        })
    }

    fn take_read(&mut self) -> u64 {
        self.next_read += 1;
        self.next_read - 1
    }

    /// One event, then the plan, as the loop does.
    fn step(&mut self, event: Event) -> Vec<Action> {
        let mut actions = self.core.on(event, self.now);
        actions.extend(self.core.settle(self.now));
        actions
    }

    fn advance(&mut self, by: Duration) -> Vec<Action> {
        self.now += by;
        self.step(Event::Tick)
    }

    /// Starts on `yaml` and reports the first apply a success.
    fn started(yaml: &str) -> Self {
        let mut harness = Self::new(None);
        let actions = harness.read(yaml);
        assert!(script(&actions).is_some(), "{actions:?}");
        let actions = harness.applied();
        assert!(actions.contains(&Action::Ready), "{actions:?}");
        harness
    }

    fn applied(&mut self) -> Vec<Action> {
        self.step(Event::Applied(Ok(Duration::from_millis(3))))
    }

    /// Reports every apply a success until none follows (a backend
    /// dropped from rotation lingers, then goes in one of its own).
    fn settled(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let actions = self.applied();
            let again = script(&actions).is_some();
            all.extend(actions);
            if !again {
                return all;
            }
        }
    }
}

/// The one transaction among `actions`.
fn script(actions: &[Action]) -> Option<&str> {
    let mut scripts = actions.iter().filter_map(|a| match a {
        Action::Apply(script) => Some(script.as_str()),
        _ => None,
    });
    let first = scripts.next();
    assert!(scripts.next().is_none(), "two transactions: {actions:?}");
    first
}

fn notices(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

fn rotation(target: &str, upstreams: &[SocketAddr]) -> Rotation {
    Rotation::from([(nft::chain_name(target), upstreams.iter().copied().collect())])
}

#[test]
fn a_fresh_start_creates_the_table_and_starts_checkers() {
    let mut harness = Harness::new(None);
    let actions = harness.read(TWO_CHECKED);
    let script = script(&actions).expect("a first transaction");
    assert!(script.starts_with("table inet lobby {"), "{script}");
    assert!(!script.contains("delete table"), "{script}");
    // Only web2 starts available.
    assert!(
        slots(script, '4') == Some("0 : 198.18.1.12 . 9000"),
        "{script}"
    );
    let checkers: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::StartChecker { id, available, .. } => Some((id.upstream.as_str(), *available)),
            _ => None,
        })
        .collect();
    assert_eq!(checkers, [("web1", false), ("web2", true)]);
    assert!(actions.contains(&Action::TrackCounters(BackendDelta {
        gone: BTreeSet::new(),
        added: BTreeSet::from([(socket(11), Protocol::Tcp), (socket(12), Protocol::Tcp)]),
    })));
    let actions = harness.applied();
    assert_eq!(
        actions,
        [Action::Ready, Action::ListTable { generation: 1 }]
    );
}

#[test]
fn the_first_apply_failing_aborts_the_start() {
    let mut harness = Harness::new(None);
    harness.read(TWO_CHECKED);
    let actions = harness.step(Event::Applied(Err("nft: no such file".into())));
    assert_eq!(actions, [Action::Abort("nft: no such file".into())]);
}

#[test]
fn a_takeover_replaces_the_table_and_keeps_balanced_upstreams_available() {
    // The dead run balanced to web1 (which starts unavailable by config).
    let mut harness = Harness::new(Some(rotation("web", &[socket(11)])));
    let actions = harness.read(TWO_CHECKED);
    let script = script(&actions).expect("a first transaction");
    assert!(
        script.starts_with("add table ip lobby\ndelete table ip lobby\nadd table ip6 lobby\ndelete table ip6 lobby\nadd table inet lobby\ndelete table inet lobby\n"),
        "{script}"
    );
    assert!(
        slots(script, '4') == Some("0 : 198.18.1.11 . 9000, 1 : 198.18.1.12 . 9000"),
        "{script}"
    );
    assert!(
        actions.contains(&Action::StartChecker {
            id: id("web1"),
            check: config(TWO_CHECKED).targets[0].group.upstreams[0]
                .health_check
                .clone()
                .unwrap(),
            key: AddressKey::Family(Family::Ipv4),
            available: true,
            address: socket(11).ip(),
        })
    );
}

#[test]
fn a_takeover_waits_for_names_then_inherits_what_they_resolve_to() {
    let mut harness = Harness::new(Some(rotation("web", &[socket(11)])));
    let actions = harness.read(NAMED);
    assert!(script(&actions).is_none(), "waits for DNS: {actions:?}");
    let key = ResolverKey::new("web1.example.test", None);
    assert!(actions.contains(&Action::StartResolver(key.clone())));
    assert_eq!(
        harness.core.next_deadline(),
        Some(harness.now + TAKEOVER_DNS_WAIT)
    );
    let actions = harness.step(Event::Address(AddressUpdate {
        key,
        addresses: vec![socket(11).ip()],
    }));
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::StartChecker {
                available: true,
                ..
            }
        )),
        "{actions:?}"
    );
    let script = script(&actions).expect("applies once resolved");
    assert!(script.contains("0 : 198.18.1.11 . 9000"), "{script}");
}

#[test]
fn a_takeover_applies_after_the_wait_when_a_name_never_resolves() {
    let mut harness = Harness::new(Some(rotation("web", &[socket(11)])));
    harness.read(NAMED);
    let actions = harness.advance(TAKEOVER_DNS_WAIT);
    let script = script(&actions).expect("applies after the wait");
    assert!(script.contains("reject with tcp reset"), "{script}");
}

#[test]
fn health_flaps_in_one_batch_make_one_transaction() {
    let mut harness = Harness::started(TWO_CHECKED);
    let mut actions = harness.core.on(report("web1", true), harness.now);
    actions.extend(harness.core.on(report("web2", false), harness.now));
    actions.extend(harness.core.settle(harness.now));
    let script = script(&actions).expect("one transaction");
    // One upstream for another: the slot count stays, the chain too.
    assert!(!script.contains("flush chain"), "{script}");
    assert_eq!(slots(script, '4'), Some("0 : 198.18.1.11 . 9000"));
    assert_eq!(
        notices(&actions),
        [
            "upstream web/web1 is UP (connected, 1/1 success); 2 of 2 available",
            "upstream web/web2 is DOWN (connect refused, 1/1 failure); 1 of 2 available",
        ]
    );
}

#[test]
fn changes_during_an_apply_wait_for_its_outcome() {
    let mut harness = Harness::started(TWO_CHECKED);
    let actions = harness.step(report("web1", true));
    assert!(script(&actions).is_some());
    let actions = harness.step(report("web2", false));
    assert!(script(&actions).is_none(), "one transaction at a time");
    let actions = harness.applied();
    let script = script(&actions).expect("the change made meanwhile");
    assert!(
        slots(script, '4') == Some("0 : 198.18.1.11 . 9000"),
        "{script}"
    );
}

/// A reload that arrives while another change is being applied is
/// reported when its own transaction is applied, not the other's: the
/// policy test once saw "reload applied" before its SNAT rule existed.
#[test]
fn a_reload_during_an_apply_is_reported_after_its_own_transaction() {
    let mut harness = Harness::started(TWO_CHECKED);
    assert!(script(&harness.step(report("web1", true))).is_some());
    let changed = TWO_CHECKED.replace("port: 8081", "port: 8082");
    let actions = harness.read(&changed);
    assert!(script(&actions).is_none(), "one transaction at a time");
    let actions = harness.applied();
    assert!(
        !notices(&actions)
            .iter()
            .any(|n| n.starts_with("reload applied")),
        "reported with the transaction before it: {:?}",
        notices(&actions)
    );
    let reload = script(&actions).expect("the reload's own transaction");
    assert!(reload.contains("8082"), "{reload}");
    let actions = harness.applied();
    assert!(
        notices(&actions)
            .iter()
            .any(|n| n.starts_with("reload applied")),
        "{:?}",
        notices(&actions)
    );
}

#[test]
fn a_report_that_changes_nothing_applies_nothing() {
    let mut harness = Harness::started(TWO_CHECKED);
    assert_eq!(harness.step(report("web2", true)), []);
}

#[test]
fn a_failed_apply_is_retried_whole_after_a_second() {
    let mut harness = Harness::started(TWO_CHECKED);
    harness.step(report("web1", true));
    let actions = harness.step(Event::Applied(Err("kernel said no".into())));
    assert_eq!(
        notices(&actions),
        ["applying the ruleset failed; the previous one stays, retrying in 1s: kernel said no"]
    );
    assert!(script(&actions).is_none());
    assert!(script(&harness.advance(Duration::from_millis(500))).is_none());
    let actions = harness.advance(Duration::from_millis(500));
    let script = script(&actions).expect("the retry");
    assert!(
        script.starts_with("add table ip lobby\ndelete table ip lobby\nadd table ip6 lobby\ndelete table ip6 lobby\nadd table inet lobby\ndelete table inet lobby\n"),
        "the table's content is unknown after a failure: {script}"
    );
}

#[test]
fn a_reload_keeps_unchanged_upstreams_and_restarts_changed_ones() {
    let mut harness = Harness::started(TWO_CHECKED);
    harness.step(report("web1", true));
    harness.applied();
    // web1 unchanged; web2's port changes; web3 is new.
    let next = TWO_CHECKED.replace(
        "198.18.1.12\n              port: 9000",
        "198.18.1.12\n              port: 9001",
    ) + "            - name: web3\n              host: 198.18.1.13\n              port: 9000\n";
    let actions = harness.read(&next);
    assert!(
        actions.contains(&Action::StopChecker {
            id: id("web2"),
            key: AddressKey::Family(Family::Ipv4)
        }),
        "{actions:?}"
    );
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::StartChecker { id, .. } if id.upstream == "web1")),
        "web1 keeps its checker: {actions:?}"
    );
    let script = script(&actions).expect("a change");
    // web1 stays available, web2 restarts available (its start state), web3 has no check.
    assert!(
        slots(script, '4')
            == Some("0 : 198.18.1.11 . 9000, 1 : 198.18.1.12 . 9001, 2 : 198.18.1.13 . 9000"),
        "{script}"
    );
    let actions = harness.applied();
    assert_eq!(
        notices(&actions),
        ["reload applied: ~1 target, +1 upstream, ~1 upstream"]
    );
    assert_eq!(harness.core.reloads().succeeded, 1);
}

/// Upstreams listed out of name order, a host that becomes a name and a
/// name that becomes an address, and a removed target with a name of its
/// own: the core compares the running and the new upstreams in name order,
/// and the resolvers follow the names still in use (the debug build's
/// check in `adopt` compares them with every upstream's).
#[test]
fn a_reload_in_any_upstream_order_moves_names_and_resolvers() {
    let target = |name: &str, port: u16, upstreams: &[(&str, &str)]| {
        let mut yaml = format!(
            "      - name: {name}\n        protocol: tcp\n        port: {port}\n        upstream_group:\n          name: {name}-pool\n          distribution: round-robin\n          upstreams:\n"
        );
        for (upstream, host) in upstreams {
            yaml += &format!("            - {{ name: {upstream}, host: {host}, port: 9000 }}\n");
        }
        yaml
    };
    let file = |targets: &[String]| {
        format!(
            "lb:\n  - engine: nftables\n    targets:\n{}",
            targets.concat()
        )
    };
    let before = file(&[
        target(
            "web",
            8081,
            &[
                ("zeta", "198.18.1.13"),
                ("alpha", "alpha.example.test"),
                ("mid", "198.18.1.12"),
            ],
        ),
        target("api", 8082, &[("one", "api.example.test")]),
    ]);
    let after = file(&[target(
        "web",
        8081,
        &[
            ("zeta", "zeta.example.test"),
            ("beta", "198.18.1.14"),
            ("alpha", "198.18.1.11"),
        ],
    )]);
    let mut harness = Harness::started(&before);
    let actions = harness.read(&after);
    let resolvers: BTreeSet<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::StartResolver(key) => Some(format!("start {key:?}")),
            Action::StopResolver(key) => Some(format!("stop {key:?}")),
            _ => None,
        })
        .collect();
    let expected: BTreeSet<String> = [
        ("start", "zeta.example.test"),
        ("stop", "alpha.example.test"),
        ("stop", "api.example.test"),
    ]
    .iter()
    .map(|(what, name)| format!("{what} {:?}", ResolverKey::new(name, None)))
    .collect();
    assert_eq!(resolvers, expected);
    // In the file's order: beta at once, alpha at its new address; zeta
    // waits for its name.
    let script = script(&actions).expect("a change");
    assert!(
        slots(script, '4') == Some("0 : 198.18.1.14 . 9000, 1 : 198.18.1.11 . 9000"),
        "{script}"
    );
    let actions = harness.applied();
    assert_eq!(
        notices(&actions),
        ["reload applied: -1 target, ~1 target, +1 upstream, -2 upstreams, ~2 upstreams"]
    );
}

#[test]
fn a_weight_change_is_a_changed_target_and_keeps_the_checkers() {
    let mut harness = Harness::started(TWO_CHECKED);
    let next = TWO_CHECKED.replace(
        "198.18.1.12\n              port: 9000\n",
        "198.18.1.12\n              port: 9000\n              weight: 3\n",
    );
    assert_ne!(next, TWO_CHECKED);
    let actions = harness.read(&next);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::StartChecker { .. } | Action::StopChecker { .. })),
        "{actions:?}"
    );
    let actions = [actions, harness.applied()].concat();
    assert!(
        notices(&actions).contains(&"reload applied: ~1 target".to_owned()),
        "{:?}",
        notices(&actions)
    );
}

#[test]
fn a_reload_without_changes_says_so_without_a_transaction() {
    let mut harness = Harness::started(TWO_CHECKED);
    let actions = harness.read(TWO_CHECKED);
    assert!(script(&actions).is_none());
    assert_eq!(notices(&actions), ["reload applied: no change"]);
}

#[test]
fn an_invalid_reload_changes_nothing() {
    let mut harness = Harness::started(TWO_CHECKED);
    let actions = harness.refused("test.yaml:3:5: bad");
    assert!(script(&actions).is_none());
    assert_eq!(
        notices(&actions),
        ["reload failed, the running configuration stays:\ntest.yaml:3:5: bad"]
    );
    assert!(!harness.core.reloads().last_successful);
}

/// The reads of the file that a step's reload notices answer: applied
/// through the first, refused the second.
fn reloads_answered(actions: &[Action]) -> (Vec<u64>, Vec<u64>) {
    let mut answered = (Vec::new(), Vec::new());
    for action in actions {
        match action {
            Action::Notify(Notice::ReloadApplied(summary)) => answered.0.push(summary.read()),
            Action::Notify(Notice::ReloadFailed { read, .. }) => answered.1.push(*read),
            _ => {}
        }
    }
    answered
}

#[test]
fn a_reload_notice_names_the_newest_read_it_holds() {
    let mut harness = Harness::started(TWO_CHECKED);
    let on_port = |port: &str| TWO_CHECKED.replace("port: 8081", &format!("port: {port}"));
    // Read 1 commits; 2 and 3 come meanwhile, and 4 is refused.
    let actions = harness.read(&on_port("8082"));
    assert!(script(&actions).is_some());
    for port in ["8083", "8084"] {
        let actions = harness.read(&on_port(port));
        assert!(script(&actions).is_none(), "one transaction at a time");
        assert_eq!(reloads_answered(&actions), (vec![], vec![]));
    }
    let actions = harness.refused("test.yaml:3:5: bad");
    assert_eq!(reloads_answered(&actions), (vec![], vec![4]));
    let actions = harness.applied();
    assert_eq!(reloads_answered(&actions), (vec![1], vec![]));
    // Read 3 superseded read 2 before it was applied: one transaction.
    assert!(script(&actions).expect("read 3's").contains("8084"));
    let actions = harness.applied();
    assert_eq!(reloads_answered(&actions), (vec![3], vec![]));
}

#[test]
fn an_operators_command_is_applied_once_the_kernel_has_it() {
    let mut harness = Harness::started(TWO_CHECKED);
    // web2 is in rotation: its drain is a transaction.
    let drain = harness
        .core
        .admin(&id("web2"), AdminState::Drained)
        .unwrap();
    assert_eq!(harness.core.commands_applied(), drain - 1);
    let actions = harness.core.settle(harness.now);
    assert!(script(&actions).is_some(), "{actions:?}");
    assert_eq!(
        harness.core.commands_applied(),
        drain - 1,
        "still on its way"
    );
    harness.step(Event::Applied(Err("nft: busy".into())));
    assert_eq!(harness.core.commands_applied(), drain - 1, "failed");
    let actions = harness.advance(APPLY_RETRY);
    assert!(script(&actions).is_some(), "the retry: {actions:?}");
    harness.applied();
    assert_eq!(harness.core.commands_applied(), drain);
    // Said again, it is true already.
    assert_eq!(
        harness.core.admin(&id("web2"), AdminState::Drained),
        Ok(drain)
    );
    // web1 is down: out of rotation either way, no transaction.
    let disable = harness
        .core
        .admin(&id("web1"), AdminState::Disabled)
        .unwrap();
    let actions = harness.core.settle(harness.now);
    assert!(script(&actions).is_none(), "{actions:?}");
    assert_eq!(harness.core.commands_applied(), disable);
}

#[test]
fn a_removed_upstream_stays_masqueraded_until_its_linger_ends() {
    let mut harness = Harness::started(TWO_CHECKED);
    let without_web2 = &TWO_CHECKED[..TWO_CHECKED.find("            - name: web2").unwrap()];
    let actions = harness.read(without_web2);
    let script_text = script(&actions).expect("a change").to_owned();
    assert!(
        !script_text.contains("delete element inet lobby backends"),
        "{script_text}"
    );
    assert!(actions.contains(&Action::StopChecker {
        id: id("web2"),
        key: AddressKey::Family(Family::Ipv4)
    }));
    harness.applied();
    assert_eq!(
        harness.core.next_deadline(),
        Some(harness.now + model::BACKEND_LINGER)
    );
    assert!(script(&harness.advance(Duration::from_secs(1))).is_none());
    let actions = harness.advance(Duration::from_secs(1));
    assert_eq!(
        script(&actions),
        Some("delete element inet lobby backends4 { 198.18.1.12 . tcp . 9000 }\n")
    );
}

#[test]
fn a_name_that_moves_moves_its_upstream_and_its_probes() {
    let mut harness = Harness::new(None);
    let actions = harness.read(NAMED);
    assert!(script(&actions).unwrap().contains("reject with tcp reset"));
    harness.applied();
    let key = ResolverKey::new("web1.example.test", None);
    let actions = harness.step(Event::Address(AddressUpdate {
        key: key.clone(),
        addresses: vec![socket(11).ip()],
    }));
    // The first address starts as the health check says.
    assert!(
        actions.contains(&Action::StartChecker {
            id: id("web1"),
            key: AddressKey::Family(Family::Ipv4),
            check: config(NAMED).targets[0].group.upstreams[0]
                .health_check
                .clone()
                .unwrap(),
            available: false,
            address: socket(11).ip()
        })
    );
    // Resolved but not yet healthy: counted, not balanced.
    assert!(actions.contains(&Action::TrackCounters(BackendDelta {
        gone: BTreeSet::new(),
        added: BTreeSet::from([(socket(11), Protocol::Tcp)]),
    })));
    harness.step(report("web1", true));
    harness.applied();
    let actions = harness.step(Event::Address(AddressUpdate {
        key,
        addresses: vec![socket(21).ip()],
    }));
    // The address moves with its health; the checker follows it.
    assert!(actions.contains(&Action::SetProbeAddress {
        id: id("web1"),
        key: AddressKey::Family(Family::Ipv4),
        address: socket(21).ip()
    }));
    let script = script(&actions).expect("a move");
    assert!(script.contains("0 : 198.18.1.21 . 9000"), "{script}");
}

/// The listing of `text` that the listing action of `generation` asked
/// for, which took `elapsed`.
fn listed_in(generation: u64, text: &str, elapsed: Duration) -> Event {
    Event::TableListed {
        generation,
        listing: Ok(Some(text.to_owned())),
        elapsed,
    }
}

const LISTED: &str = "table inet lobby {\n\tchain prerouting {\n\t}\n}\n";

/// The generations of the listings among `actions`.
fn listings(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ListTable { generation } => Some(*generation),
            _ => None,
        })
        .collect()
}

#[test]
fn an_outside_change_of_the_table_is_repaired_whole() {
    let mut harness = Harness::started(TWO_CHECKED);
    let listed = |generation, text: Option<&str>| Event::TableListed {
        generation,
        listing: Ok(text.map(str::to_owned)),
        elapsed: Duration::ZERO,
    };
    assert_eq!(harness.step(listed(1, Some(LISTED))), []);
    // A listing that matches is quiet.
    assert_eq!(
        harness.step(Event::TableMayHaveChanged(Outside::Possible)),
        [Action::ListTable { generation: 1 }]
    );
    assert_eq!(harness.step(listed(1, Some(LISTED))), []);
    // A rule inserted by hand.
    harness.step(Event::TableMayHaveChanged(Outside::Changed));
    let tampered = LISTED.replace("prerouting {\n", "prerouting {\n\t\tdrop\n");
    let actions = harness.step(listed(1, Some(&tampered)));
    assert_eq!(
        notices(&actions),
        ["table inet lobby was changed outside Lobby (added `drop`); restoring it"]
    );
    let repair = script(&actions).expect("a repair");
    assert!(
        repair.contains("add table inet lobby\ndelete table inet lobby\n"),
        "{repair}"
    );
    // Deleted outright: created again, nothing to delete.
    harness.applied();
    harness.step(listed(2, Some(LISTED)));
    harness.step(Event::TableMayHaveChanged(Outside::Changed));
    let actions = harness.step(listed(2, None));
    assert_eq!(
        notices(&actions),
        ["table inet lobby was changed outside Lobby (the table was deleted); restoring it"]
    );
    assert!(script(&actions).unwrap().starts_with("table inet lobby {"));
}

#[test]
fn a_listing_taken_during_an_apply_proves_nothing() {
    let mut harness = Harness::started(TWO_CHECKED);
    let listed = |generation| listed_in(generation, LISTED, Duration::ZERO);
    harness.step(listed(1));
    harness.step(Event::TableMayHaveChanged(Outside::Possible));
    // An apply starts before the listing comes back: the listing is stale.
    assert!(script(&harness.step(report("web1", true))).is_some());
    assert_eq!(harness.step(listed(1)), []);
    // Nor are listings asked for while the apply is in flight.
    assert_eq!(
        harness.step(Event::TableMayHaveChanged(Outside::Possible)),
        []
    );
}

#[test]
fn while_outside_changes_are_heard_lobby_lists_its_own_at_most_a_twentieth_of_the_time() {
    let mut harness = Harness::started(TWO_CHECKED);
    harness.core.hear_outside(true);
    let listed_at = harness.now;
    harness.step(listed_in(1, LISTED, Duration::from_secs(1)));
    assert!(script(&harness.step(report("web1", true))).is_some());
    // The listing waits 19 times its own second after the last one.
    assert!(listings(&harness.settled()).is_empty());
    let due = listed_at + Duration::from_secs(19);
    assert_eq!(harness.core.next_deadline(), Some(due));
    // Lobby's next change meanwhile is applied at once, and listed once.
    harness.now += Duration::from_secs(5);
    assert!(script(&harness.step(report("web1", false))).is_some());
    assert!(listings(&harness.settled()).is_empty());
    // The backend it dropped lingers a while, then goes in an apply of
    // its own: not listed either.
    let mut actions = harness.advance(Duration::from_secs(13));
    if script(&actions).is_some() {
        actions.extend(harness.settled());
    }
    assert!(listings(&actions).is_empty(), "{actions:?}");
    harness.now = due;
    let generation = match listings(&harness.step(Event::Tick))[..] {
        [generation] => generation,
        ref other => panic!("one listing: {other:?}"),
    };
    assert_eq!(harness.core.next_deadline(), None);
    // Without the notifications, an outside change in that pause would be
    // taken for Lobby's: the listing follows each apply.
    harness.step(listed_in(generation, LISTED, Duration::from_secs(1)));
    harness.core.hear_outside(false);
    harness.step(report("web1", true));
    assert_eq!(listings(&harness.settled()), [generation + 1]);
}

#[test]
fn an_outside_change_before_lobby_listed_its_own_is_repaired() {
    let mut harness = Harness::started(TWO_CHECKED);
    harness.core.hear_outside(true);
    harness.step(listed_in(1, LISTED, Duration::from_secs(1)));
    harness.step(report("web1", true));
    harness.settled();
    // The listing would show the outside change as if Lobby had made it.
    assert_eq!(
        harness.step(Event::TableMayHaveChanged(Outside::Changed)),
        [Action::ListTable { generation: 2 }]
    );
    let actions = harness.step(listed_in(2, LISTED, Duration::from_secs(1)));
    assert_eq!(
        notices(&actions),
        [
            "table inet lobby was changed outside Lobby (a change heard of before Lobby had listed its own); restoring it"
        ]
    );
    assert!(script(&actions).is_some_and(|s| s.contains("delete table inet lobby")));
    // The repair's own listing waits its pause too.
    assert!(listings(&harness.settled()).is_empty());
    assert_eq!(
        harness.advance(Duration::from_secs(19)),
        [Action::ListTable { generation: 3 }]
    );
    harness.step(listed_in(3, LISTED, Duration::from_secs(1)));
    let mut actions = harness.step(report("web2", false));
    actions.extend(harness.settled());
    let applies = actions.iter().filter(|a| matches!(a, Action::Apply(_)));
    let generation = 3 + applies.count() as u64;
    // A commit beside Lobby's own may not have touched the table: the
    // listing is taken for Lobby's, as without the pause.
    assert_eq!(
        harness.step(Event::TableMayHaveChanged(Outside::Possible)),
        [Action::ListTable { generation }]
    );
    assert_eq!(
        harness.step(listed_in(generation, LISTED, Duration::ZERO)),
        []
    );
}

#[test]
fn an_outside_change_during_lobbys_own_is_repaired_after_it() {
    let mut harness = Harness::started(TWO_CHECKED);
    harness.core.hear_outside(true);
    harness.step(listed_in(1, LISTED, Duration::ZERO));
    harness.step(report("web1", true));
    assert_eq!(
        harness.step(Event::TableMayHaveChanged(Outside::Changed)),
        []
    );
    let actions = harness.applied();
    assert_eq!(
        notices(&actions),
        [
            "table inet lobby was changed outside Lobby (a change heard of during Lobby's own); restoring it"
        ]
    );
    assert!(script(&actions).is_some_and(|s| s.contains("delete table inet lobby")));
}

#[test]
fn describes_changes_by_lines() {
    assert_eq!(
        describe_change("a\nb\n", "a\nc\n"),
        "added `c`; removed `b`"
    );
    assert_eq!(
        describe_change("", "1\n2\n3\n4\n5\n"),
        "added `1`, `2`, `3` and 2 more"
    );
}

#[test]
fn a_change_is_applying_until_the_kernel_has_it() {
    let mut harness = Harness::started(TWO_CHECKED);
    assert!(!harness.core.is_applying());
    // Reported but not yet planned: on its way.
    harness.core.on(report("web1", true), harness.now);
    assert!(harness.core.is_applying());
    assert!(script(&harness.core.settle(harness.now)).is_some());
    assert!(harness.core.is_applying());
    harness.applied();
    assert!(!harness.core.is_applying());
    // A retry waits for time, not for the kernel.
    harness.step(report("web2", false));
    harness.step(Event::Applied(Err("refused".into())));
    assert!(!harness.core.is_applying());
}

/// Three upstreams without health checks under `distribution`.
fn three(distribution: &str) -> String {
    let checked = distribution == "least-latency";
    let mut yaml = format!(
        "
lb:
  - engine: nftables
    targets:
      - name: web
        protocol: tcp
        port: 8081
        upstream_group:
          name: pool
          distribution: {distribution}
          upstreams:
"
    );
    for host in 11..=13 {
        yaml.push_str(&format!(
            "            - {{ name: web{}, host: 198.18.1.{host}, port: 9000",
            host - 10
        ));
        if checked {
            yaml.push_str(
                ", health_check: { protocol: tcp, port: 9000, start_available: true, \
                 probe: { check_interval: 1, timeout: 1, success_count: 1 } }",
            );
        }
        yaml.push_str(" }\n");
    }
    yaml
}

/// The IPv4 address of upstream `name`, as its checker's latency names it.
fn ipv4_of(name: &str) -> (UpstreamId, AddressKey) {
    (id(name), AddressKey::Family(Family::Ipv4))
}

fn established(counts: &[(u8, u64)]) -> Event {
    Event::Measured(Measures::Established(
        counts
            .iter()
            .map(|(host, n)| ((socket(*host), Protocol::Tcp), *n))
            .collect(),
    ))
}

/// The elements `script` gives target web's slot map of family `digit`
/// (`4` or `6`), however it writes them: in a table, a new map or a
/// refill.
fn slots(script: &str, digit: char) -> Option<&str> {
    let map = format!("target-web_slots{digit}");
    let refill = format!("add element inet lobby {map} {{ ");
    let start = match script.find(&refill) {
        Some(at) => at + refill.len(),
        None => {
            let declared = [
                format!("add map inet lobby {map} {{"),
                format!("\tmap {map} {{"),
            ]
            .iter()
            .find_map(|declared| script.find(declared.as_str()))?;
            let elements = "elements = { ";
            declared + script[declared..].find(elements)? + elements.len()
        }
    };
    let end = start + script[start..].find(" }")?;
    Some(&script[start..end])
}

#[test]
fn least_connections_follows_the_counts_at_most_once_a_second() {
    let mut harness = Harness::started(&three("least-connections"));
    // Before any count, every upstream: one came in 0.2 s after the start.
    harness.now += Duration::from_millis(200);
    let actions = harness.step(established(&[(11, 20)]));
    assert_eq!(
        script(&actions),
        None,
        "within a second of the first choice"
    );
    let actions = harness.advance(Duration::from_millis(800));
    let script_text = script(&actions).expect("the choice changes once the second is over");
    assert_eq!(
        slots(script_text, '4'),
        Some("0 : 198.18.1.12 . 9000, 1 : 198.18.1.13 . 9000")
    );
    harness.applied();
    // The same preference again changes nothing.
    harness.now += Duration::from_millis(1500);
    assert_eq!(script(&harness.step(established(&[(11, 21)]))), None);
    // web2 gains connections: web3 alone has the fewest, at once (the
    // last change was 1.5 s ago), in one transaction.
    let actions = harness.step(established(&[(11, 21), (12, 8), (13, 1)]));
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.13 . 9000")
    );
    harness.applied();
    // Ties share: counts per weight, here all weights 1.
    harness.now += Duration::from_millis(1000);
    let actions = harness.step(established(&[(11, 21), (12, 4), (13, 4)]));
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.12 . 9000, 1 : 198.18.1.13 . 9000")
    );
}

#[test]
fn a_rotation_change_chooses_again_at_once() {
    let yaml = three("least-connections");
    let mut harness = Harness::started(&yaml);
    harness.now += Duration::from_millis(1000);
    harness.step(established(&[(11, 3), (12, 5), (13, 5)]));
    harness.applied();
    // web1 drained by the operator: out of rotation, the choice is made
    // again within the same transaction, without waiting for the second.
    harness.now += Duration::from_millis(100);
    harness
        .core
        .admin(&id("web1"), AdminState::Drained)
        .unwrap();
    let actions = harness.step(Event::Tick);
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.12 . 9000, 1 : 198.18.1.13 . 9000")
    );
}

#[test]
fn least_latency_takes_the_fast_upstreams_and_leaves_the_slow_one() {
    let mut harness = Harness::started(&three("least-latency"));
    harness.now += Duration::from_secs(1);
    let latency = BTreeMap::from([
        (ipv4_of("web1"), Duration::from_millis(50)),
        (ipv4_of("web2"), Duration::from_micros(300)),
        (ipv4_of("web3"), Duration::from_micros(900)),
    ]);
    let actions = harness.step(Event::Measured(Measures::Latency(latency)));
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.12 . 9000, 1 : 198.18.1.13 . 9000")
    );
    harness.applied();
    // Only web1 measured yet: it is the only one known to answer.
    harness.now += Duration::from_secs(1);
    let only_slow = BTreeMap::from([(ipv4_of("web1"), Duration::from_millis(50))]);
    let actions = harness.step(Event::Measured(Measures::Latency(only_slow)));
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.11 . 9000")
    );
}

#[test]
fn persistence_keeps_a_set_and_chain_per_backend_in_rotation() {
    let yaml = TWO_CHECKED.replace(
        "distribution: round-robin",
        "distribution: round-robin\n          persistence: { timeout: 3 }",
    );
    let mut harness = Harness::started(&yaml);
    let actions = harness.step(report("web1", true));
    let joined = script(&actions).expect("web1 joins");
    let web1 = "target-web.198.18.1.11.9000.tcp.3s";
    let web2 = "target-web.198.18.1.12.9000.tcp.3s";
    assert!(
        joined.starts_with(&format!(
            "add element inet lobby backends4 {{ 198.18.1.11 . tcp . 9000 }}\n\
             add set inet lobby {web1} {{ type ipv4_addr; flags dynamic,timeout; timeout 3s; }}\n\
             add chain inet lobby {web1}\n\
             add rule inet lobby {web1} meta l4proto tcp update @{web1} {{ ip saddr }} dnat ip to 198.18.1.11:9000\n\
             flush chain inet lobby target-web\n"
        )),
        "{joined}"
    );
    assert!(
        joined.contains(&format!(
            "ip saddr @{web1} goto {web1}\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn ip saddr @{web2} goto {web2}\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn numgen inc mod 2 vmap {{ 0 : goto {web1}, 1 : goto {web2} }}\n"
        )),
        "{joined}"
    );
    harness.applied();
    // web1 leaves rotation: its clients are forgotten with its set, after
    // the target chain stops referring to it.
    let actions = harness.step(report("web1", false));
    let left = script(&actions).expect("web1 leaves");
    assert!(
        left.ends_with(&format!(
            "delete chain inet lobby {web1}\ndelete set inet lobby {web1}\n"
        )),
        "{left}"
    );
}

/// One upstream on a name, checked, with one address of each family or
/// (`all_addresses`) every address of the answer.
/// The loop holds a new checker's first probe until the counting task has
/// tracked the actions of its step: its address must be among them even
/// when the step plans no transaction (one is in flight), or the probe's
/// late answer would count as the upstream's traffic.
#[test]
fn an_address_is_tracked_in_the_step_that_starts_its_checker_even_during_an_apply() {
    let mut harness = Harness::new(None);
    let actions = harness.read(NAMED);
    assert!(script(&actions).is_some());
    let actions = answer(&mut harness, &[socket(11).ip()]);
    assert!(script(&actions).is_none(), "the first apply is in flight");
    assert_eq!(
        checkers_started(&actions),
        [(AddressKey::Family(Family::Ipv4), socket(11).ip())]
    );
    assert!(actions.contains(&Action::TrackCounters(BackendDelta {
        gone: BTreeSet::new(),
        added: BTreeSet::from([(socket(11), Protocol::Tcp)]),
    })));
    let actions = harness.applied();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::TrackCounters(_))),
        "tracked once: {actions:?}"
    );
}

fn named_checked(all_addresses: bool) -> String {
    format!("{NAMED}              dns: {{ all_addresses: {all_addresses} }}\n")
        .replace("start_available: false", "start_available: true")
}

fn v6(host: u16) -> IpAddr {
    IpAddr::from([0x2001, 2, 0, 1, 0, 0, 0, host])
}

fn answer(harness: &mut Harness, addresses: &[IpAddr]) -> Vec<Action> {
    harness.step(Event::Address(AddressUpdate {
        key: ResolverKey::new(
            "web1.example.test",
            harness.core.config().unwrap().targets[0].group.upstreams[0]
                .dns
                .as_ref(),
        ),
        addresses: addresses.to_vec(),
    }))
}

fn checkers_started(actions: &[Action]) -> Vec<(AddressKey, IpAddr)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::StartChecker { key, address, .. } => Some((*key, *address)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_name_that_gains_an_aaaa_serves_ipv6_clients_at_it() {
    let mut harness = Harness::started(&named_checked(false));
    let actions = answer(&mut harness, &[socket(11).ip()]);
    assert_eq!(
        checkers_started(&actions),
        [(AddressKey::Family(Family::Ipv4), socket(11).ip())]
    );
    let first = script(&actions).expect("the IPv4 address").to_owned();
    assert!(
        slots(&first, '4') == Some("0 : 198.18.1.11 . 9000"),
        "{first}"
    );
    assert!(!first.contains("dnat ip6"), "{first}");
    harness.applied();
    // A+AAAA: the IPv4 address stays as it was, the IPv6 one joins with a
    // checker of its own.
    let actions = answer(&mut harness, &[socket(11).ip(), v6(0x11)]);
    assert_eq!(
        checkers_started(&actions),
        [(AddressKey::Family(Family::Ipv6), v6(0x11))]
    );
    let second = script(&actions).expect("the IPv6 address").to_owned();
    assert!(
        slots(&second, '6') == Some("0 : 2001:2:0:1::11 . 9000"),
        "{second}"
    );
    // The IPv4 rule is added again beside the IPv6 one; its map stays.
    assert_eq!(slots(&second, '4'), None, "{second}");
    assert!(
        second.contains("dnat ip to numgen inc mod 1 map @target-web_slots4"),
        "{second}"
    );
    harness.applied();
    assert_eq!(
        harness
            .core
            .counted_upstreams()
            .map(|(_, b)| b.0.ip())
            .collect::<Vec<_>>(),
        [socket(11).ip(), v6(0x11)]
    );
    // The IPv6 address fails its checks: IPv6 clients are refused, IPv4
    // ones still served; the line names the address.
    let actions = harness.step(report_at("web1", v6(0x11), false));
    assert_eq!(
        notices(&actions),
        [
            "upstream web/web1 at 2001:2:0:1::11 is DOWN (connect refused, 1/1 failure); 1 of 2 available"
        ]
    );
    let script = script(&actions).expect("IPv6 out of rotation");
    assert!(!script.contains("dnat ip6"), "{script}");
    assert!(
        script.contains("meta nfproto ipv6 meta l4proto tcp reject with tcp reset"),
        "{script}"
    );
    assert!(
        script.contains("delete map inet lobby target-web_slots6"),
        "{script}"
    );
    assert!(
        script.contains("dnat ip to numgen inc mod 1 map @target-web_slots4"),
        "{script}"
    );
}

#[test]
fn an_address_of_a_family_moves_with_its_health_and_leaves_with_its_family() {
    let mut harness = Harness::started(&named_checked(false));
    answer(&mut harness, &[socket(11).ip(), v6(0x11)]);
    harness.applied();
    harness.step(report_at("web1", v6(0x11), false));
    harness.applied();
    // A rotated answer moves nothing.
    assert_eq!(
        answer(&mut harness, &[v6(0x11), socket(12).ip(), socket(11).ip()]),
        []
    );
    // The IPv6 address moves: still DOWN until its checker says otherwise.
    let actions = answer(&mut harness, &[socket(11).ip(), v6(0x12)]);
    assert!(actions.contains(&Action::SetProbeAddress {
        id: id("web1"),
        key: AddressKey::Family(Family::Ipv6),
        address: v6(0x12)
    }));
    assert!(script(&actions).is_none(), "{actions:?}");
    // The AAAA goes: its checker stops, IPv4 stays.
    let actions = answer(&mut harness, &[socket(11).ip()]);
    assert_eq!(
        actions
            .iter()
            .filter(|a| matches!(a, Action::StopChecker { .. }))
            .collect::<Vec<_>>(),
        [&Action::StopChecker {
            id: id("web1"),
            key: AddressKey::Family(Family::Ipv6)
        }]
    );
    let held: Vec<IpAddr> = harness
        .core
        .upstream(&id("web1"))
        .unwrap()
        .values()
        .map(|a| a.address)
        .collect();
    assert_eq!(held, [socket(11).ip()]);
}

#[test]
fn all_addresses_makes_each_address_a_backend_and_a_removed_one_drains() {
    let mut harness = Harness::started(&named_checked(true));
    let [a, b, c] = [11, 12, 13].map(|h| socket(h).ip());
    let actions = answer(&mut harness, &[c, a, b]);
    assert_eq!(
        checkers_started(&actions),
        [a, b, c].map(|x| (AddressKey::Address(x), x))
    );
    let script_text = script(&actions).expect("three backends").to_owned();
    assert!(
        slots(&script_text, '4')
            == Some("0 : 198.18.1.11 . 9000, 1 : 198.18.1.12 . 9000, 2 : 198.18.1.13 . 9000"),
        "{script_text}"
    );
    harness.applied();
    // One address fails: only it leaves.
    let actions = harness.step(report_at("web1", b, false));
    assert_eq!(
        notices(&actions),
        [
            "upstream web/web1 at 198.18.1.12 is DOWN (connect refused, 1/1 failure); 2 of 3 available"
        ]
    );
    harness.applied();
    harness.step(report_at("web1", b, true));
    harness.applied();
    // The answer shrinks: the removed address stops being balanced, its
    // checker stops, and it stays masqueraded for the linger.
    let actions = answer(&mut harness, &[a, c]);
    assert!(actions.contains(&Action::StopChecker {
        id: id("web1"),
        key: AddressKey::Address(b)
    }));
    let script_text = script(&actions).expect("two backends").to_owned();
    assert!(
        slots(&script_text, '4') == Some("0 : 198.18.1.11 . 9000, 1 : 198.18.1.13 . 9000"),
        "{script_text}"
    );
    assert!(!script_text.contains("delete element"), "{script_text}");
    harness.applied();
    assert_eq!(
        harness.core.next_deadline(),
        Some(harness.now + model::BACKEND_LINGER)
    );
    // A late report of the dropped address changes nothing.
    assert_eq!(harness.step(report_at("web1", b, false)), []);
    let actions = harness.advance(model::BACKEND_LINGER);
    assert_eq!(
        script(&actions),
        Some("delete element inet lobby backends4 { 198.18.1.12 . tcp . 9000 }\n")
    );
    // It grows again: the new address starts as its check says.
    let d = socket(14).ip();
    harness.applied();
    let actions = answer(&mut harness, &[a, c, d]);
    assert_eq!(checkers_started(&actions), [(AddressKey::Address(d), d)]);
    assert!(script(&actions).unwrap().contains("numgen inc mod 3"));
}

#[test]
fn a_target_of_one_family_takes_only_that_familys_addresses() {
    let yaml = named_checked(true).replace(
        "        port: 8081\n",
        "        port: 8081\n        ip: 198.18.0.10\n",
    );
    let mut harness = Harness::started(&yaml);
    let actions = answer(&mut harness, &[socket(11).ip(), v6(0x11)]);
    assert_eq!(
        checkers_started(&actions),
        [(AddressKey::Address(socket(11).ip()), socket(11).ip())]
    );
}

#[test]
fn least_latency_measures_each_address_of_an_upstream_apart() {
    let yaml =
        named_checked(true).replace("distribution: round-robin", "distribution: least-latency");
    let mut harness = Harness::started(&yaml);
    let [fast, slow] = [11, 12].map(|h| socket(h).ip());
    answer(&mut harness, &[fast, slow]);
    harness.applied();
    harness.now += Duration::from_secs(1);
    let latency = BTreeMap::from([
        (
            (id("web1"), AddressKey::Address(fast)),
            Duration::from_micros(300),
        ),
        (
            (id("web1"), AddressKey::Address(slow)),
            Duration::from_millis(50),
        ),
    ]);
    let actions = harness.step(Event::Measured(Measures::Latency(latency)));
    assert_eq!(
        slots(script(&actions).expect("a change"), '4'),
        Some("0 : 198.18.1.11 . 9000")
    );
}

#[test]
fn a_share_changed_in_part_moves_only_what_differs() {
    let backend =
        |last: u8| -> Backend { (SocketAddr::from(([198, 18, 1, last], 9000)), Protocol::Tcp) };
    let mut tally = Tally::default();
    let mut changes = BackendDelta::default();
    tally.set("a", Some(vec![backend(2), backend(1)]), &mut changes);
    tally.set("b", Some(vec![backend(2)]), &mut changes);
    assert_eq!(changes.added, [backend(1), backend(2)].into());
    // One backend left and one came: the one kept is not let go.
    let mut changes = BackendDelta::default();
    tally.set("a", Some(vec![backend(3), backend(2)]), &mut changes);
    assert_eq!(changes.gone, [backend(1)].into());
    assert_eq!(changes.added, [backend(3)].into());
    // Another source still holds what one lets go.
    let mut changes = BackendDelta::default();
    tally.set("a", None, &mut changes);
    assert_eq!(changes.gone, [backend(3)].into());
    assert!(changes.added.is_empty());
    assert_eq!(tally.union, [backend(2)].into());
    tally.set("b", Some(Vec::new()), &mut changes);
    assert!(tally.union.is_empty() && tally.refs.is_empty());
}

#[test]
fn a_large_reload_logs_its_first_lines_at_info() {
    let mut lines = ReloadLines::default();
    let loud = (0..RELOAD_LINES + 5).filter(|_| lines.loud()).count();
    assert_eq!(loud, RELOAD_LINES);
    assert_eq!(lines.0, RELOAD_LINES + 5);
}

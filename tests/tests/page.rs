//! The status page in a real browser: headless Chromium in the load
//! balancer's namespace opens the page of the running daemon and reads the
//! live DOM over the DevTools protocol, before and after an upstream fails.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NetNs, Repeat, Topology,
    browser::{self, Browser},
    fixtures::{ConfigBuilder, UPSTREAM_PORT, health_check, start_servers, target_addr},
    lobby::target_dir,
    privileged,
    server::ask_name,
    wait_for,
};

/// Probes: every second, one failure makes an upstream DOWN, timeout 1 s.
const INTERVAL: Duration = Duration::from_secs(1);
const FAILURES: u32 = 1;
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The test's own console error.
const CANARY: &str = "lobby-test canary";
/// How often the page polls `/api/stats`.
const REFRESH: Duration = Duration::from_secs(2);

/// The upstream rows the page shows (not filtered out): `target/upstream`
/// and the text of its state cell.
fn shown_rows(browser: &mut Browser) -> Vec<(String, String)> {
    let rows = browser.evaluate(
        "JSON.stringify([...document.querySelectorAll('tr[data-upstream]')]
            .filter((row) => !row.hidden && !row.closest('details').hidden)
            .map((row) => [row.dataset.upstream, row.querySelector('.state').textContent]))",
    );
    serde_json::from_str(rows.as_str().expect("a string")).expect("rows as JSON")
}

fn rows(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(upstream, state)| ((*upstream).to_owned(), (*state).to_owned()))
        .collect()
}

#[test]
fn the_page_shows_every_upstream_and_a_failure_without_a_reload() {
    if !privileged() || !browser::available() {
        return;
    }
    // web0..web2 behind `web`, and a fourth server behind `api`.
    let topology = Topology::new(4);
    let mut servers = start_servers(&topology);
    let listen = SocketAddr::from((Topology::LB_ADDR, 9091));
    let check = health_check(UPSTREAM_PORT, true, INTERVAL.as_secs() as u32, 1, FAILURES);
    let config = ConfigBuilder::new()
        .target("web", 8081)
        .topology_upstreams(3, &check)
        .target("api", 8082)
        .upstream("api0", Topology::upstream_addr(3), UPSTREAM_PORT)
        .metrics(&listen.to_string())
        .build();
    let _lobby = Lobby::start(&topology.lb, &config);
    wait_for("the page's port", Duration::from_secs(10), || {
        topology.lb.connect(listen, Duration::from_secs(1)).ok()
    });
    let mut browser = Browser::open(&topology.lb, &format!("http://{listen}/"));
    // Proves that the console is watched: this one complaint must be found.
    browser.evaluate(&format!("console.error('{CANARY}')"));

    let all_up = rows(&[
        ("web/web0", "UP"),
        ("web/web1", "UP"),
        ("web/web2", "UP"),
        ("api/api0", "UP"),
    ]);
    wait_for(
        "every upstream on the page",
        Duration::from_secs(20),
        || (shown_rows(&mut browser) == all_up).then_some(()),
    );

    // Rates come from two polls: connections flow until the end, so that
    // the page (and the screenshot) shows some.
    let client = NetNs::attach(&topology.client.name);
    let _traffic = Repeat::spawn(move || {
        // Failures are expected: an upstream stops meanwhile.
        let _ = ask_name(&client, target_addr(8081));
        std::thread::sleep(Duration::from_millis(20));
    });
    wait_for(
        "a connection rate on the page",
        Duration::from_secs(20),
        || {
            let rate = browser.evaluate(
            "document.querySelector('tr[data-upstream=\"web/web0\"] .connection-rate').textContent",
        );
            (rate.as_str().and_then(|r| r.parse::<f64>().ok()) > Some(0.0)).then_some(())
        },
    );
    // A reload would make a new window object and forget this mark.
    browser.evaluate("window.lobbyTestMark = 'still here'");
    let nodes = "document.getElementsByTagName('*').length";
    let before = browser.evaluate(nodes);

    let stopped = Instant::now();
    drop(servers.remove(1));
    let budget = INTERVAL * FAILURES + PROBE_TIMEOUT + REFRESH;
    let web1_down = rows(&[
        ("web/web0", "UP"),
        ("web/web1", "DOWN"),
        ("web/web2", "UP"),
        ("api/api0", "UP"),
    ]);
    wait_for("web1 DOWN on the page", budget * 3, || {
        (shown_rows(&mut browser) == web1_down).then_some(())
    });
    let took = stopped.elapsed();
    assert!(
        took <= budget,
        "the page showed web1 DOWN {took:?} after its server stopped; at most {budget:?} \
         (interval x failures + timeout + one refresh)"
    );
    assert_eq!(browser.evaluate("window.lobbyTestMark"), "still here");
    // Another refresh changes figures in place: no element more or less.
    std::thread::sleep(REFRESH + Duration::from_millis(500));
    assert_eq!(browser.evaluate(nodes), before, "the page's DOM grew");

    // The filter: by upstream name, then the DOWN ones only.
    let filter = |text: &str| {
        format!(
            "{{ const filter = document.getElementById('filter');
             filter.value = '{text}'; filter.dispatchEvent(new Event('input')) }}"
        )
    };
    browser.evaluate(&filter("WEB1"));
    wait_for("the filter to apply", Duration::from_secs(5), || {
        (shown_rows(&mut browser) == rows(&[("web/web1", "DOWN")])).then_some(())
    });
    browser.evaluate(&filter(""));
    browser.evaluate("document.getElementById('down-only').click()");
    wait_for("only DOWN to apply", Duration::from_secs(5), || {
        (shown_rows(&mut browser) == rows(&[("web/web1", "DOWN")])).then_some(())
    });
    browser.evaluate("document.getElementById('down-only').click()");
    wait_for("every upstream again", Duration::from_secs(5), || {
        (shown_rows(&mut browser) == web1_down).then_some(())
    });

    let screenshot = target_dir().join("page.png");
    browser.screenshot(&screenshot);
    eprintln!(
        "web1 DOWN on the page after {took:?}; screenshot in {}",
        screenshot.display()
    );
    let (canaries, complaints): (Vec<String>, Vec<String>) = browser
        .complaints()
        .into_iter()
        .partition(|complaint| complaint.contains(CANARY));
    assert!(!canaries.is_empty(), "the console is not watched");
    assert!(
        complaints.is_empty(),
        "the page's console:\n{}",
        complaints.join("\n")
    );
}

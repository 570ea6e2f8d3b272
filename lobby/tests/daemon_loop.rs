//! The daemon's loop in-process on a recording fake data plane, in the
//! style of mini-redis's tests: start it, send it events (a file change, a
//! stats request, an outside change of the table), observe what it did,
//! shut it down. Needs no root and no kernel.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use lobby::{
    ctl,
    daemon::{self, Options},
    model::{Backend, BackendDelta},
    nft::{NftError, Rotation},
    plane::{DataPlane, Lookup},
    table_watch::Heard,
};
use lobby_common::UpstreamCounters;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

const CONFIG: &str = "
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
            - { name: web1, host: 198.18.1.11, port: 9000 }
            - { name: web2, host: 198.18.1.12, port: 9000 }
";

/// Records every call; the table's listing is whatever the test says.
#[derive(Default)]
struct FakePlane {
    applied: Mutex<Vec<String>>,
    tracked: Mutex<BTreeSet<Backend>>,
    listing: Mutex<Option<String>>,
    listings: Mutex<usize>,
    removed: Mutex<bool>,
    /// Where the loop wants to hear of table changes.
    table_changed: Mutex<Option<watch::Sender<Heard>>>,
}

impl FakePlane {
    fn applied(&self) -> Vec<String> {
        self.applied.lock().unwrap().clone()
    }
}

impl DataPlane for FakePlane {
    async fn existing_rotation(&self) -> Result<Option<Rotation>, NftError> {
        Ok(None)
    }

    async fn apply(&self, script: String) -> Result<(), NftError> {
        self.applied.lock().unwrap().push(script);
        *self.listing.lock().unwrap() = Some("table inet lobby {\n}\n".to_owned());
        Ok(())
    }

    async fn list_table(&self) -> Result<Option<String>, NftError> {
        *self.listings.lock().unwrap() += 1;
        Ok(self.listing.lock().unwrap().clone())
    }

    async fn track(&self, change: &BackendDelta, _: Lookup) {
        change.apply_to(&mut self.tracked.lock().unwrap());
    }

    fn read_counters(&self) -> BTreeMap<Backend, UpstreamCounters> {
        self.tracked
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                let counters = UpstreamCounters {
                    connections: 7,
                    ..Default::default()
                };
                (*b, counters)
            })
            .collect()
    }

    async fn read_denied(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }

    fn watch_table(
        &self,
        changed: watch::Sender<Heard>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        *self.table_changed.lock().unwrap() = Some(changed);
        async move { cancel.cancelled().await }
    }

    async fn remove(&self) {
        *self.removed.lock().unwrap() = true;
    }
}

/// Polls `check` until it holds, for at most 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_loop_applies_answers_reloads_repairs_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("lobby.yaml");
    std::fs::write(&config_path, CONFIG).unwrap();
    let options = Options {
        config_path: config_path.clone(),
        pin_dir: Some(dir.path().join("pins")),
        socket_path: Some(dir.path().join("lobby.sock")),
        traffic_log_interval: None,
        counters: false,
        table_notifications: true,
        nft_process: false,
    };
    let plane = Arc::new(FakePlane::default());
    let (stop, stopped) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let parsed = lobby::config::Parsed::parse(CONFIG.to_owned(), &config_path).unwrap();
    let daemon = tokio::spawn(daemon::serve(
        options.clone(),
        parsed,
        plane.clone(),
        async move {
            let _ = stopped.await;
        },
        move || {
            let _ = ready_tx.send(());
        },
    ));
    ready_rx.await.expect("the daemon becomes ready");

    // The first transaction creates the table with both upstreams.
    let first = plane.applied();
    assert_eq!(first.len(), 1);
    assert!(first[0].starts_with("table inet lobby {"), "{}", first[0]);
    assert!(first[0].contains("numgen inc mod 2"), "{}", first[0]);

    // Stats come from the core's state and the plane's counters.
    let stats = ctl::fetch_stats(&options.socket_path("lobby"))
        .await
        .unwrap();
    let upstreams = &stats.targets[0].upstreams;
    assert_eq!(upstreams.len(), 2);
    assert!(upstreams.iter().all(|u| u.available && u.connections == 7));

    // A changed file is picked up by the watch and applied as a diff.
    std::fs::write(
        &config_path,
        CONFIG.replace(
            "            - { name: web2, host: 198.18.1.12, port: 9000 }\n",
            "",
        ),
    )
    .unwrap();
    eventually("the reload's transaction", || plane.applied().len() >= 2).await;
    assert!(
        plane.applied()[1].contains("numgen inc mod 1"),
        "{:?}",
        plane.applied()
    );

    // An outside change of the table: the whole table is applied again.
    eventually("the table's watch", || {
        plane.table_changed.lock().unwrap().is_some()
    })
    .await;
    // The listing after each apply is the fingerprint: one per apply.
    eventually("the fingerprint of the reload", || {
        *plane.listings.lock().unwrap() >= 2
    })
    .await;
    let before = plane.applied().len();
    *plane.listing.lock().unwrap() = Some("table inet lobby {\n\tdrop\n}\n".to_owned());
    let notify = plane.table_changed.lock().unwrap().clone().unwrap();
    notify.send_modify(|heard| heard.named += 1);
    eventually("the repair", || {
        plane
            .applied()
            .iter()
            .skip(before)
            .any(|s| s.contains("add table inet lobby\ndelete table inet lobby\n"))
    })
    .await;

    stop.send(()).unwrap();
    daemon.await.unwrap().expect("a clean stop");
    assert!(*plane.removed.lock().unwrap(), "the ruleset is removed");
    assert!(
        !options.socket_path("lobby").exists(),
        "the socket is removed"
    );
}

//! Leader election on a real kube-apiserver's Lease. The reference is client-go's
//! `tools/leaderelection` (`LeaderElector.tryAcquireOrRenew`, `renew`, `release`): a crashed
//! leader's Lease is taken over once it went unrenewed for a lease duration; a leader cut off
//! from the API server steps down at its renew deadline, before anyone else may lead; a leader
//! that shuts down releases the Lease so the next one leads at once.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meshid::{
    clock::SystemClock,
    leader::{Elector, LeaderElectionConfig},
    state::StateLocation,
};
use tokio::sync::watch;

use super::{
    cluster::{client_from, Cluster},
    proxy::TcpProxy,
    state::on_secret_state,
};
use crate::server_support::TestServer;

fn fast(ns: &str) -> LeaderElectionConfig {
    LeaderElectionConfig {
        enabled: true,
        namespace: ns.into(),
        name: "meshid-leader".into(),
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(250),
        ..Default::default()
    }
}

/// One candidate, and every change of its leadership with when it happened.
struct Candidate {
    leading: watch::Receiver<bool>,
    changes: Arc<Mutex<Vec<(Instant, bool)>>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn candidate(
    kubeconfig: &std::path::Path,
    name: &str,
    cfg: LeaderElectionConfig,
) -> Candidate {
    let client = client_from(kubeconfig).await;
    let (tx, leading) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let elector = Elector::new(client, cfg, name.into(), Arc::new(SystemClock));
    let task = tokio::spawn(elector.run(tx, stop_rx));
    let changes: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
    let (mut rx, log) = (leading.clone(), changes.clone());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let v = *rx.borrow_and_update();
            log.lock().unwrap().push((Instant::now(), v));
        }
    });
    Candidate {
        leading,
        changes,
        stop,
        task,
    }
}

async fn until_leading(c: &Candidate, want: bool, limit: Duration) -> Instant {
    let mut rx = c.leading.clone();
    tokio::time::timeout(limit, rx.wait_for(|l| *l == want))
        .await
        .unwrap_or_else(|_| panic!("leading={want} not reached within {limit:?}"))
        .unwrap();
    Instant::now()
}

/// Issue 21: one leader; a crashed leader (no release) is replaced once its Lease went
/// unrenewed for the lease duration, and not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_crashed_leaders_lease_is_taken_over_after_the_lease_duration() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("leader-crash").await;
    let cfg = fast(&ns);
    let a = candidate(&cluster.admin_kubeconfig, "replica-a", cfg.clone()).await;
    until_leading(&a, true, Duration::from_secs(10)).await;
    let b = candidate(&cluster.admin_kubeconfig, "replica-b", cfg.clone()).await;
    tokio::time::sleep(cfg.lease_duration + cfg.retry_period * 2).await;
    assert!(!*b.leading.borrow(), "one leader while the first renews");

    a.task.abort(); // a crash: no release
    let crashed = Instant::now();
    let took_over = until_leading(&b, true, cfg.lease_duration * 3).await;
    let takeover = took_over - crashed;
    eprintln!(
        "kube_real::leader: crashed leader replaced after {:.2} s (lease {:?}, retry {:?})",
        takeover.as_secs_f64(),
        cfg.lease_duration,
        cfg.retry_period
    );
    assert!(
        takeover + cfg.retry_period * 2 >= cfg.lease_duration,
        "taken over before the lease ran out: {takeover:?}"
    );
    assert!(
        takeover <= cfg.lease_duration + cfg.retry_period * 4,
        "{takeover:?}"
    );
    let _ = b.stop.send(true);
    b.task.await.unwrap();
    drop(a.stop);
}

/// Issue 21: a leader cut off from the API server stops leading at its renew deadline, before
/// the other replica may take over (so no schedule runs on two replicas), and does not lead
/// again when it comes back while the other holds the Lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn a_leader_cut_off_steps_down_before_another_takes_over() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("leader-cut").await;
    let cfg = fast(&ns);
    let proxy = TcpProxy::start(&cluster.url).await;
    let via_proxy = cluster.admin_kubeconfig.with_extension("proxied");
    std::fs::write(
        &via_proxy,
        std::fs::read_to_string(&cluster.admin_kubeconfig)
            .unwrap()
            .replace(&cluster.url, &proxy.url()),
    )
    .unwrap();
    let a = candidate(&via_proxy, "replica-a", cfg.clone()).await;
    until_leading(&a, true, Duration::from_secs(10)).await;
    let b = candidate(&cluster.admin_kubeconfig, "replica-b", cfg.clone()).await;

    proxy.cut();
    let cut = Instant::now();
    let a_stepped_down = until_leading(&a, false, cfg.lease_duration * 3).await;
    let b_leads = until_leading(&b, true, cfg.lease_duration * 3).await;
    eprintln!(
        "kube_real::leader: cut-off leader stepped down after {:.2} s, the other led after {:.2} s",
        (a_stepped_down - cut).as_secs_f64(),
        (b_leads - cut).as_secs_f64()
    );
    assert!(
        a_stepped_down < b_leads,
        "two leaders at once: a stepped down {:?} after b took over",
        a_stepped_down - b_leads
    );
    assert!(a_stepped_down - cut <= cfg.renew_deadline + cfg.retry_period * 2);

    proxy.heal();
    tokio::time::sleep(cfg.lease_duration).await;
    assert!(
        !*a.leading.borrow(),
        "b holds the Lease; a stays a follower"
    );
    assert!(*b.leading.borrow());
    // Never both: every interval one led, the other did not.
    let (ca, cb) = (
        a.changes.lock().unwrap().clone(),
        b.changes.lock().unwrap().clone(),
    );
    assert_eq!(ca.iter().filter(|(_, v)| *v).count(), 1, "{ca:?}");
    assert_eq!(cb.iter().filter(|(_, v)| *v).count(), 1, "{cb:?}");
    for s in [a.stop, b.stop] {
        let _ = s.send(true);
    }
    let _ = tokio::join!(a.task, b.task);
}

/// Issue 21: two servers on one Secret state elect one leader (`meshid_leader` 1 on one, 0 on
/// the other); the leader's shutdown releases the Lease and the other leads within a retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real kube-apiserver and etcd: run tools/kube-tests.sh"]
async fn two_servers_elect_one_leader_and_hand_over_on_shutdown() {
    let cluster = Cluster::shared().await;
    let ns = cluster.namespace("leader-servers").await;
    let loc: StateLocation = format!("kube://{ns}/meshid-ca-state").parse().unwrap();
    let start = |name: &'static str, seed: bool| {
        let (loc, kc, ns) = (loc.clone(), cluster.admin_kubeconfig.clone(), ns.clone());
        TestServer::start_with(Arc::new(SystemClock), move |cfg| {
            on_secret_state(cfg, &loc, &kc, seed);
            cfg.leader_election = LeaderElectionConfig {
                identity: Some(name.into()),
                kubeconfig: Some(kc),
                ..fast(&ns)
            };
        })
    };
    let a = start("replica-a", true).await;
    let b = start("replica-b", false).await;
    let leaders = || {
        (
            a.running.metrics.leader.get(),
            b.running.metrics.leader.get(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while leaders().0 + leaders().1 != 1 {
        assert!(
            Instant::now() < deadline,
            "no single leader: {:?}",
            leaders()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leaders().0 + leaders().1, 1, "still one leader");
    let (leader, follower) = if leaders().0 == 1 { (a, b) } else { (b, a) };
    let stopped = Instant::now();
    leader.running.shutdown().await;
    while follower.running.metrics.leader.get() != 1 {
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "the Lease was not handed over on shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "kube_real::leader: handed over on shutdown in {:.0} ms",
        stopped.elapsed().as_secs_f64() * 1e3
    );
    follower.running.shutdown().await;
}

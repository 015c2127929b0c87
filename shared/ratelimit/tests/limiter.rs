//! The limiter against a real Redis: bursts, replicas, per-IP rules, expiry, and Redis slow,
//! down or restarted.

mod common;

use std::{
    net::IpAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use fred::{
    prelude::{ClientLike, KeysInterface, LuaInterface, Value},
    types::CustomCommand,
};
use futures::future::join_all;
use stowage_local::LocalRedis;
use stowage_ratelimit::{Class, Decision, Limiter, Rule, Subject};

fn user(name: &str) -> Subject {
    Subject::User(name.to_owned())
}

fn ip(address: &str) -> Subject {
    Subject::Ip(address.parse::<IpAddr>().expect("ip address"))
}

fn allowed(decisions: &[Decision]) -> usize {
    decisions
        .iter()
        .filter(|d| **d == Decision::Allowed)
        .count()
}

/// A check that must answer within a second whatever Redis does (a liveness bound, not a
/// benchmark: the configured timeout is 100 ms).
async fn check_live(limiter: &Limiter, class: Class, subjects: &[Subject]) -> Decision {
    tokio::time::timeout(Duration::from_secs(1), limiter.check(class, subjects))
        .await
        .expect("a check answers within 1 s even when redis does not")
}

/// Checks until the limiter is no longer degraded (Redis answers again), for at most 20 s.
async fn wait_recovered(limiter: &Limiter, class: Class, subject: &Subject) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        check_live(limiter, class, std::slice::from_ref(subject)).await;
        if !limiter.degraded() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "limiter still degraded 20 s after redis came back"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_burst_is_cut_at_the_burst_size_and_touches_no_other_user_or_class() {
    let redis = common::redis().await;
    let limiter = Limiter::with_prefix(
        common::client(&redis.url).await,
        common::limits(Rule::new(1.0, 50), Rule::new(1000.0, 10_000), true),
        common::prefix(),
    );
    let alice = [user("alice")];

    let decisions = join_all((0..200).map(|_| limiter.check(Class::Upload, &alice))).await;

    let passed = allowed(&decisions);
    assert!((50..=52).contains(&passed), "{passed} of 200 allowed");
    for decision in &decisions {
        if let Decision::Limited { retry_after } = decision {
            // One call a second refills: the wait is positive and at most about a second.
            assert!(*retry_after > Duration::ZERO);
            assert!(
                *retry_after <= Duration::from_millis(1_100),
                "{retry_after:?}"
            );
        }
    }
    assert_eq!(
        decisions.len() - passed,
        decisions
            .iter()
            .filter(|d| matches!(d, Decision::Limited { .. }))
            .count()
    );
    assert_eq!(
        limiter.check(Class::Upload, &[user("bob")]).await,
        Decision::Allowed
    );
    assert_eq!(
        limiter.check(Class::Download, &alice).await,
        Decision::Allowed
    );
    assert!(!limiter.degraded());
}

#[tokio::test]
async fn replicas_with_their_own_connections_share_one_bucket() {
    let redis = common::redis().await;
    let prefix = common::prefix();
    let limits = common::limits(Rule::new(1.0, 50), Rule::new(1000.0, 10_000), true);
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let client = common::client(&redis.url).await;
        replicas.push(Limiter::with_prefix(client, limits.clone(), prefix.clone()));
    }
    let carol = [user("carol")];

    let decisions =
        join_all((0..200).map(|i| replicas[i % replicas.len()].check(Class::List, &carol))).await;

    let passed = allowed(&decisions);
    assert!((50..=52).contains(&passed), "{passed} of 200 allowed");
}

#[tokio::test]
async fn an_ip_rule_limits_on_its_own_and_a_refused_call_takes_from_no_bucket() {
    let redis = common::redis().await;
    let limiter = Limiter::with_prefix(
        common::client(&redis.url).await,
        common::limits(Rule::new(0.01, 8), Rule::new(0.01, 5), true),
        common::prefix(),
    );
    let office = ip("192.0.2.10");
    let home = ip("198.51.100.20");

    // Dave's own rule allows 8, the office address only 5.
    let dave_at_office = [user("dave"), office.clone()];
    let from_office =
        join_all((0..10).map(|_| limiter.check(Class::Download, &dave_at_office))).await;
    assert_eq!(allowed(&from_office), 5);
    // Anyone else behind the same address is refused too.
    assert!(matches!(
        limiter
            .check(Class::Download, &[user("erin"), office.clone()])
            .await,
        Decision::Limited { .. }
    ));
    // From home Dave has the 3 calls his own bucket still holds: the 5 refused calls from
    // the office (and Erin's) took nothing from the user buckets.
    let dave_at_home = [user("dave"), home.clone()];
    let from_home = join_all((0..6).map(|_| limiter.check(Class::Download, &dave_at_home))).await;
    assert_eq!(allowed(&from_home), 3);
    assert_eq!(
        limiter.check(Class::Download, &[user("erin"), home]).await,
        Decision::Allowed
    );
}

#[tokio::test]
async fn a_limited_subject_is_allowed_again_after_retry_after() {
    let redis = common::redis().await;
    let limiter = Limiter::with_prefix(
        common::client(&redis.url).await,
        common::limits(Rule::new(20.0, 5), Rule::new(1000.0, 10_000), true),
        common::prefix(),
    );
    let frank = [user("frank")];
    for _ in 0..5 {
        assert_eq!(limiter.check(Class::Admin, &frank).await, Decision::Allowed);
    }
    let Decision::Limited { retry_after } = limiter.check(Class::Admin, &frank).await else {
        panic!("the sixth call of a burst of 5 must be limited");
    };
    assert!(retry_after <= Duration::from_millis(50), "{retry_after:?}");

    tokio::time::sleep(retry_after).await;

    assert_eq!(limiter.check(Class::Admin, &frank).await, Decision::Allowed);
}

#[tokio::test]
async fn buckets_expire_once_idle() {
    let redis = common::redis().await;
    let client = common::client(&redis.url).await;
    let limiter = Limiter::with_prefix(
        client.clone(),
        common::limits(Rule::new(2.0, 10), Rule::new(1.0, 10), true),
        common::prefix(),
    );
    let subjects = [user("grace"), ip("192.0.2.1")];
    assert_eq!(
        limiter.check(Class::Other, &subjects).await,
        Decision::Allowed
    );

    let user_ttl: i64 = client
        .pttl(limiter.key(Class::Other, &subjects[0]))
        .await
        .unwrap();
    let ip_ttl: i64 = client
        .pttl(limiter.key(Class::Other, &subjects[1]))
        .await
        .unwrap();
    // One call at 2/s (user) and 1/s (ip) puts each bucket that far ahead of now.
    assert!(
        (1..=500).contains(&user_ttl),
        "user bucket ttl {user_ttl} ms"
    );
    assert!((1..=1000).contains(&ip_ttl), "ip bucket ttl {ip_ttl} ms");

    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let left: i64 = client
        .exists(vec![
            limiter.key(Class::Other, &subjects[0]),
            limiter.key(Class::Other, &subjects[1]),
        ])
        .await
        .unwrap();
    assert_eq!(left, 0, "idle buckets are gone");
}

#[tokio::test]
async fn a_flushed_script_cache_is_refilled_and_buckets_keep_counting() {
    let redis = common::redis().await;
    let client = common::client(&redis.url).await;
    let limiter = Limiter::with_prefix(
        client.clone(),
        common::limits(Rule::new(0.01, 3), Rule::new(1000.0, 10_000), true),
        common::prefix(),
    );
    let heidi = [user("heidi")];
    for _ in 0..3 {
        assert_eq!(
            limiter.check(Class::Upload, &heidi).await,
            Decision::Allowed
        );
    }

    client.script_flush(false).await.unwrap();

    assert!(matches!(
        limiter.check(Class::Upload, &heidi).await,
        Decision::Limited { .. }
    ));
    assert!(!limiter.degraded(), "NOSCRIPT is handled, not an outage");
}

#[tokio::test]
async fn a_stalled_redis_fails_open_within_the_timeout_and_recovers() {
    // CLIENT PAUSE stalls every client of this server: use one of our own.
    let redis = LocalRedis::start().await.unwrap();
    let admin = common::client(&redis.url()).await;
    let limiter = Limiter::with_prefix(
        common::client(&redis.url()).await,
        common::limits(Rule::new(0.01, 2), Rule::new(1000.0, 10_000), true),
        common::prefix(),
    );
    let ivan = [user("ivan")];
    assert_eq!(limiter.check(Class::List, &ivan).await, Decision::Allowed);

    let _: Value = admin
        .custom(
            CustomCommand::new_static("CLIENT", None, false),
            vec!["PAUSE", "1500", "ALL"],
        )
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            check_live(&limiter, Class::List, &ivan).await,
            Decision::Allowed
        );
    }
    assert!(limiter.degraded());

    // Checks that timed out while paused may still run once Redis resumes (a command cannot
    // be taken back once written), so recovery is probed with a user of its own.
    wait_recovered(&limiter, Class::List, &user("judy")).await;
    let ken = [user("ken")];
    for _ in 0..2 {
        assert_eq!(limiter.check(Class::List, &ken).await, Decision::Allowed);
    }
    assert!(matches!(
        limiter.check(Class::List, &ken).await,
        Decision::Limited { .. }
    ));
}

#[tokio::test]
async fn redis_down_fails_open_or_closed_as_configured_and_a_restart_heals() {
    let redis = LocalRedis::start().await.unwrap();
    let port = redis.port();
    let url = redis.url();
    let client = common::client(&url).await;
    let prefix = common::prefix();
    let open = Limiter::with_prefix(
        client.clone(),
        common::limits(Rule::new(0.01, 2), Rule::new(1000.0, 10_000), true),
        prefix.clone(),
    );
    let closed = Limiter::with_prefix(
        client.clone(),
        common::limits(Rule::new(0.01, 2), Rule::new(1000.0, 10_000), false),
        prefix,
    );
    let mallory = [user("mallory")];
    for _ in 0..2 {
        assert_eq!(open.check(Class::Upload, &mallory).await, Decision::Allowed);
    }
    assert!(matches!(
        open.check(Class::Upload, &mallory).await,
        Decision::Limited { .. }
    ));

    redis.stop().await;

    // Fail-open: every call passes, even one over its limit, and the limiter says why.
    for _ in 0..20 {
        assert_eq!(
            check_live(&open, Class::Upload, &mallory).await,
            Decision::Allowed
        );
    }
    assert!(open.degraded());
    // Fail-closed: refused, both on the check that meets the outage and on those after it.
    for _ in 0..3 {
        assert_eq!(
            check_live(&closed, Class::Upload, &mallory).await,
            Decision::Unavailable
        );
    }
    assert!(closed.degraded());

    // Redis comes back empty on the same port (no persistence, no cached script).
    let _restarted = tokio::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("restart redis-server");

    wait_recovered(&open, Class::Upload, &user("niaj")).await;
    // The buckets were rebuilt from nothing: Mallory has a full burst again, then is limited.
    for _ in 0..2 {
        assert_eq!(open.check(Class::Upload, &mallory).await, Decision::Allowed);
    }
    assert!(matches!(
        open.check(Class::Upload, &mallory).await,
        Decision::Limited { .. }
    ));
    wait_recovered(&closed, Class::Upload, &user("olivia")).await;
}

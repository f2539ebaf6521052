//! DynamoDB-specific behaviour against dynalite started on loopback (`cd tools/dynalite && npm
//! ci`): the item layout, observe-and-take-over by version, counters kept across releases, and
//! errors, checked by reading the table directly.

use std::time::{Duration, Instant};

use leasehold_core::{
    parse_key, Duration as LDuration, Fence, Op, OwnerId, Reject, Reply, Request, RequestId,
};
use leasehold_http::{Backend, TransportError};
use leasehold_stores::DynamoDbBackend;
use leasehold_test_servers::{dynalite, dynalite_with_create_table_ms, free_port};
use serde_json::{json, Value};

mod common;
use common::{creds, dynamo_raw};

const TTL: LDuration = LDuration::from_secs(2);

fn backend(url: &str, table: &str) -> DynamoDbBackend {
    DynamoDbBackend::new(url, "us-east-1", table, creds(), Duration::from_secs(2)).unwrap()
}

async fn call(b: &DynamoDbBackend, owner: u64, op: Op) -> Result<Reply, TransportError> {
    b.call(&parse_key("pump").unwrap(), Request { id: RequestId(1), owner: OwnerId(owner), op }).await
}

async fn item(url: &str) -> Value {
    let (status, v) = dynamo_raw(
        url,
        "GetItem",
        json!({"TableName": "leases", "Key": {"key": {"S": "pump"}}, "ConsistentRead": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["Item"].clone()
}

#[test]
fn item_layout_observe_and_take_over_by_version() {
    let server = dynalite();
    let url = server.url();
    let b = backend(url, "leases");
    smol::block_on(async {
        b.create_table().await.unwrap();
        b.create_table().await.expect("creating an existing table is fine");
        let Ok(Reply::Granted { fence: f1, .. }) = call(&b, 1, Op::Acquire { ttl: TTL }).await else {
            panic!()
        };
        assert_eq!(
            item(url).await,
            json!({"key": {"S": "pump"}, "owner": {"S": "1"}, "fence": {"N": f1.0.to_string()},
                   "version": {"N": "1"}, "ttl_us": {"N": "2000000"}})
        );
        // A contender sees the record; no server clock, so it must wait out that version.
        assert_eq!(call(&b, 2, Op::Acquire { ttl: TTL }).await, Ok(Reply::Observed { version: 1, ttl: TTL }));
        // The holder renews meanwhile: the stale takeover fails and shows the new version.
        assert_eq!(
            call(&b, 1, Op::Renew { fence: f1, ttl: TTL }).await,
            Ok(Reply::Granted { fence: f1, ttl: TTL })
        );
        assert_eq!(
            call(&b, 2, Op::Takeover { version: 1, ttl: TTL }).await,
            Ok(Reply::Observed { version: 2, ttl: TTL })
        );
        // The holder goes silent; the version it left is taken over, with a new fence, and the
        // new holder is told its predecessor expired rather than released.
        let Ok(Reply::GrantedAfterExpiry { fence: f2, .. }) =
            call(&b, 2, Op::Takeover { version: 2, ttl: TTL }).await
        else {
            panic!()
        };
        assert_eq!(f2, Fence(f1.0 + 1));
        assert_eq!(call(&b, 1, Op::Renew { fence: f1, ttl: TTL }).await, Ok(Reply::NotHolder));
        assert_eq!(call(&b, 1, Op::Release { fence: f1 }).await, Ok(Reply::NotHolder));
        assert_eq!(call(&b, 2, Op::Release { fence: f1 }).await, Ok(Reply::NotHolder));
        // Released: the owner goes, the counters stay, so the next fence is higher still.
        assert_eq!(call(&b, 2, Op::Release { fence: f2 }).await, Ok(Reply::Released));
        let after = item(url).await;
        assert_eq!(after.get("owner"), None);
        assert_eq!(after["fence"], json!({"N": f2.0.to_string()}));
        assert_eq!(after["version"], json!({"N": "4"}));
        assert_eq!(
            call(&b, 3, Op::Acquire { ttl: TTL }).await,
            Ok(Reply::Granted { fence: Fence(f2.0 + 1), ttl: TTL })
        );
    });
}

#[test]
fn an_item_not_written_by_leasehold_is_misconfigured_not_a_wait() {
    let server = dynalite();
    let url = server.url();
    let b = backend(url, "leases");
    smol::block_on(async {
        b.create_table().await.unwrap();
        let put = json!({"TableName": "leases", "Item": {"key": {"S": "pump"}, "owner": {"S": "someone"}}});
        assert_eq!(dynamo_raw(url, "PutItem", put).await.0, 200);
        assert_eq!(call(&b, 1, Op::Acquire { ttl: TTL }).await, Ok(Reply::Rejected(Reject::Misconfigured)));
    });
}

#[test]
fn missing_table_and_unreachable_endpoint() {
    let server = dynalite();
    let missing = backend(server.url(), "no-such-table");
    assert_eq!(
        smol::block_on(call(&missing, 1, Op::Acquire { ttl: TTL })),
        Ok(Reply::Rejected(Reject::Misconfigured))
    );
    let dead = backend(&format!("http://127.0.0.1:{}", free_port()), "leases");
    let r = smol::block_on(call(&dead, 1, Op::Acquire { ttl: TTL }));
    assert!(matches!(r, Err(TransportError::Connect { .. })), "{r:?}");
    assert!(matches!(smol::block_on(dead.create_table()), Err(TransportError::Connect { .. })));
}

#[test]
fn create_table_waits_until_the_table_is_active() {
    let server = dynalite_with_create_table_ms(500);
    let b = backend(server.url(), "slow-table");
    let t0 = Instant::now();
    smol::block_on(b.create_table()).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(400), "returned while CREATING: {:?}", t0.elapsed());
    assert!(matches!(smol::block_on(call(&b, 1, Op::Acquire { ttl: TTL })), Ok(Reply::Granted { .. })));
}

#[test]
fn listing_scans_every_page_filtered_by_the_server_and_sorted_by_key() {
    use leasehold_stores::{Filter, KeyStatus};
    let server = dynalite();
    // One item per Scan page: a listing that stopped at the first page would show one.
    let b = backend(server.url(), "leases").with_page_size(1);
    let on = |key: &str, owner: u64, op: Op| {
        let request = Request { id: RequestId(1), owner: OwnerId(owner), op };
        smol::block_on(b.call(&parse_key(key).unwrap(), request)).unwrap()
    };
    smol::block_on(b.create_table()).unwrap();
    for (key, owner) in [("job:2", 2), ("pump", 4), ("job:10", 10), ("job:1", 1), ("job:free", 7)] {
        assert!(matches!(on(key, owner, Op::Acquire { ttl: TTL }), Reply::Granted { .. }));
    }
    assert_eq!(on("job:free", 7, Op::Release { fence: Fence(1) }), Reply::Released);
    let keys = |f: Filter| -> Vec<String> {
        smol::block_on(b.list(&f)).unwrap().into_iter().map(|k| k.key).collect()
    };
    assert_eq!(keys(Filter::default()), ["job:1", "job:10", "job:2", "job:free", "pump"]);
    assert_eq!(keys(Filter { prefix: String::new(), held_only: true }), ["job:1", "job:10", "job:2", "pump"]);
    assert_eq!(keys(Filter { prefix: "job:".into(), held_only: true }), ["job:1", "job:10", "job:2"]);
    assert_eq!(keys(Filter { prefix: "job:f".into(), held_only: false }), ["job:free"]);

    let pump = smol::block_on(b.status(&parse_key("pump").unwrap())).unwrap().expect("pump");
    let holder = pump.holder.expect("held");
    assert_eq!((holder.owner, holder.fence, holder.ttl), (OwnerId(4), Fence(1), Some(TTL.into())));
    assert_eq!(holder.remaining, None, "DynamoDB keeps no clock");
    let free = smol::block_on(b.status(&parse_key("job:free").unwrap())).unwrap();
    assert_eq!(free, Some(KeyStatus { key: "job:free".into(), holder: None, last_fence: Fence(1) }));
    assert_eq!(smol::block_on(b.status(&parse_key("never").unwrap())).unwrap(), None);

    let missing = backend(server.url(), "no-such-table");
    let refused = smol::block_on(missing.list(&Filter::default())).unwrap_err();
    assert!(refused.to_string().contains("ResourceNotFoundException"), "{refused}");
}

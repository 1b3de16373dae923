//! A randomised test of the router boundary: several clients drive the real session layer and
//! the real router of an in-process hub with random sequences, and after each sequence the hub
//! must still run and its router still route a message.
//!
//! Each sequence draws clients (admins, residents, devices, wrong or no credentials; clean or
//! persistent sessions; client ids from a small pool, so that takeovers and foreign ids happen;
//! random wills) and then random operations: publishes and subscriptions on random topics and
//! filters (multi-byte characters anywhere, `$`, `+` and `#` anywhere, empty levels, 0 to 65,535
//! bytes), QoS 0 to 2, acknowledgements missing, repeated, invented and in any order, unsubscribes,
//! garbage bytes, clean disconnects and dropped connections mid-flight. Every 250 sequences the
//! hub restarts on the same data dir, restoring what the sequences left retained.
//!
//! `cargo test --test integration fuzz` runs 2,000 sequences from a fixed seed. A longer run, with
//! a random seed that it prints first:
//!
//! ```text
//! DOMOTICPI_FUZZ_SEED=random DOMOTICPI_FUZZ_SEQUENCES=100000 cargo test --release --test integration fuzz -- --nocapture
//! ```

use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use domoticpi_house::prng::Xorshift;
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, LastWill, Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, QoS, Unsubscribe,
};

use crate::util::*;

const DEVICES: &str = "[[device]]\nid = \"d1\"\nkind = \"light\"\n\
[[device]]\nid = \"d2\"\nkind = \"motion\"\nzone = \"interior\"\n\
[[device]]\nid = \"d3\"\nkind = \"keypad\"\n";

const SEQUENCES: u64 = 2_000;
/// Sequences between restarts of the hub.
const RESTART_EVERY: u64 = 250;
const FIXED_SEED: u64 = 0xD0_A1C1_u64;

/// The credentials a random client may present.
#[derive(Debug, Clone, Copy)]
enum Who {
    Admin,
    Resident,
    Device(usize),
    WrongPassword,
    Anonymous,
}

/// One step of a sequence.
#[derive(Debug)]
enum Op {
    Publish {
        client: usize,
        topic: String,
        payload_len: usize,
        payload: u8,
        qos: u8,
        pkid: u16,
        retain: bool,
    },
    Subscribe {
        client: usize,
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        client: usize,
        pkid: u16,
        filters: Vec<String>,
    },
    /// Acknowledges a delivery (PUBACK or PUBREC by its QoS), picked by index, or an invented id.
    Ack {
        client: usize,
        pick: usize,
        invent: Option<u16>,
    },
    PubRel {
        client: usize,
        pkid: u16,
    },
    PubComp {
        client: usize,
        pick: usize,
    },
    Read {
        client: usize,
    },
    Garbage {
        client: usize,
        bytes: Vec<u8>,
    },
    Disconnect {
        client: usize,
    },
    Drop {
        client: usize,
    },
    Reconnect {
        client: usize,
    },
}

#[derive(Debug)]
struct Spec {
    who: Who,
    id: String,
    clean: bool,
    will: Option<(String, Vec<u8>, bool)>,
    wait_connack: bool,
}

struct Live {
    spec: Spec,
    conn: Option<RawClient>,
    /// QoS 1 and 2 deliveries received: (qos, packet id).
    received: Vec<(u8, u16)>,
    /// Packet ids of PUBRELs received.
    released: Vec<u16>,
}

fn pick<'a>(rng: &mut Xorshift, items: &[&'a str]) -> &'a str {
    rng.pick(items).copied().unwrap_or("")
}

/// A topic or filter: random levels, sometimes very long, sometimes starting with a multi-byte character.
fn path(rng: &mut Xorshift) -> String {
    const LEVELS: &[&str] = &[
        "dpi",
        "d1",
        "d2",
        "d3",
        "state",
        "set",
        "availability",
        "alarm",
        "scene",
        "hub",
        "a",
        "é",
        "💡",
        "$SYS",
        "$share",
        "g",
        "+",
        "#",
        "",
        "x/y",
        "tëst",
        "\u{7f}",
    ];
    if rng.chance(0.02) {
        let len = rng.below(65_536) as usize;
        return "l".repeat(len);
    }
    // Shapes real clients use, so that filters match traffic and deliveries happen.
    if rng.chance(0.3) {
        let common = pick(rng, &["#", "dpi/#", "dpi/+/set", "dpi/d1/set", "dpi/d2/state", "dpi/alarm/set", "a/#", "a"]);
        return match rng.below(4) {
            0 => format!("$share/{}/{common}", pick(rng, &["g", "h"])),
            _ => common.to_owned(),
        };
    }
    let n = 1 + rng.below(5);
    let mut levels: Vec<String> = (0..n).map(|_| pick(rng, LEVELS).to_owned()).collect();
    if rng.chance(0.1) {
        levels.insert(0, pick(rng, &["é", "💡", "ü", "$", "#", "+"]).to_owned());
    }
    if rng.chance(0.3) {
        levels[0] = "dpi".to_owned();
    }
    levels.join("/")
}

fn payload(kind: u8, len: usize) -> Vec<u8> {
    match kind % 8 {
        0 => br#"{"on":true,"brightness":120}"#.to_vec(),
        1 => br#"{"motion":true,"tamper":true}"#.to_vec(),
        2 => b"online".to_vec(),
        3 => br#"{"action":"disarm","code":"1234"}"#.to_vec(),
        4 => br#"{"scene":"evening"}"#.to_vec(),
        5 => Vec::new(),
        6 => b"ON".to_vec(),
        _ => (0..len.min(20_000)).map(|i| (i * 7 + usize::from(kind)) as u8).collect(),
    }
}

fn spec(rng: &mut Xorshift) -> Spec {
    let who = match rng.below(10) {
        0..=2 => Who::Admin,
        3..=4 => Who::Resident,
        5..=7 => Who::Device(rng.below(3) as usize),
        8 => Who::WrongPassword,
        _ => Who::Anonymous,
    };
    let id = match who {
        Who::Device(d) if rng.chance(0.9) => format!("d{}", d + 1),
        _ => pick(rng, &["c0", "c1", "c2", "c3", "d1", "", "é-phone"]).to_owned(),
    };
    let will = rng.chance(0.3).then(|| (path(rng), payload(rng.below(8) as u8, 10), rng.chance(0.5)));
    Spec { who, id, clean: rng.chance(0.6), will, wait_connack: rng.chance(0.9) }
}

fn op(rng: &mut Xorshift, clients: usize) -> Op {
    let client = rng.below(clients as u64) as usize;
    match rng.below(100) {
        0..=29 => Op::Publish {
            client,
            topic: path(rng),
            payload_len: rng.below(2_000) as usize,
            payload: rng.below(256) as u8,
            qos: rng.below(3) as u8,
            pkid: 1 + rng.below(4) as u16,
            retain: rng.chance(0.1),
        },
        30..=44 => Op::Subscribe {
            client,
            pkid: 1 + rng.below(100) as u16,
            filters: (0..1 + rng.below(3)).map(|_| (path(rng), rng.below(3) as u8)).collect(),
        },
        45..=49 => Op::Unsubscribe { client, pkid: 1 + rng.below(100) as u16, filters: vec![path(rng), "#".into()] },
        50..=64 => {
            Op::Ack { client, pick: rng.below(8) as usize, invent: rng.chance(0.15).then(|| 1 + rng.below(200) as u16) }
        }
        65..=69 => Op::PubRel { client, pkid: 1 + rng.below(6) as u16 },
        70..=76 => Op::PubComp { client, pick: rng.below(8) as usize },
        77..=88 => Op::Read { client },
        89..=90 => Op::Garbage { client, bytes: (0..1 + rng.below(12)).map(|_| rng.below(256) as u8).collect() },
        91..=93 => Op::Disconnect { client },
        94..=96 => Op::Drop { client },
        _ => Op::Reconnect { client },
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

async fn connect(plain: std::net::SocketAddr, spec: &Spec, devices: &[String]) -> Option<RawClient> {
    // Wrong passwords come from another address: the hub slows down an address that fails
    // logins, and the other clients' logins must go on at full speed.
    let from = matches!(spec.who, Who::WrongPassword).then(|| std::net::IpAddr::from([127, 0, 0, 2]));
    let mut c = RawClient::connect_plain_from(plain, from).await.ok()?;
    let login = match spec.who {
        Who::Admin => Some(("fuzz-admin", "admin-password")),
        Who::Resident => Some(("fuzz-resident", "resident-password")),
        Who::Device(d) => Some((["d1", "d2", "d3"][d], devices[d].as_str())),
        Who::WrongPassword => Some(("fuzz-admin", "wrong")),
        Who::Anonymous => None,
    };
    let will = spec.will.as_ref().map(|(topic, message, retain)| LastWill {
        topic: bytes::Bytes::copy_from_slice(topic.as_bytes()),
        message: bytes::Bytes::copy_from_slice(message),
        qos: QoS::AtLeastOnce,
        retain: *retain,
    });
    c.connect_full(&spec.id, login, 30, spec.clean, will).await;
    // Most clients wait for their CONNACK before going on; some send at once. Wrong passwords
    // never wait: their address is soon slowed down to one answer every 30 s.
    if spec.wait_connack && !matches!(spec.who, Who::WrongPassword) {
        match c.read(Duration::from_secs(2)).await {
            Read::Closed => return None,
            Read::Packet(_) | Read::Silent => {}
        }
    }
    Some(c)
}

/// Reads what arrived within `wait`, noting deliveries to acknowledge; false if the hub closed it.
async fn absorb(c: &mut Live, wait: Duration) {
    let Some(conn) = c.conn.as_mut() else { return };
    loop {
        match conn.read(wait).await {
            Read::Packet(Packet::Publish(..)) => {
                let (q, pkid) = conn.last_meta;
                if q > 0 {
                    c.received.push((q, pkid));
                }
            }
            Read::Packet(Packet::PubRel(rel, _)) => c.released.push(rel.pkid),
            Read::Packet(_) => {}
            Read::Closed => {
                c.conn = None;
                return;
            }
            Read::Silent => return,
        }
    }
}

async fn run_op(op: &Op, clients: &mut [Live], plain: std::net::SocketAddr, devices: &[String]) {
    let client = match op {
        Op::Publish { client, .. }
        | Op::Subscribe { client, .. }
        | Op::Unsubscribe { client, .. }
        | Op::Ack { client, .. }
        | Op::PubRel { client, .. }
        | Op::PubComp { client, .. }
        | Op::Read { client }
        | Op::Garbage { client, .. }
        | Op::Disconnect { client }
        | Op::Drop { client }
        | Op::Reconnect { client } => *client,
    };
    let c = &mut clients[client];
    if let Op::Reconnect { .. } = op {
        c.conn = connect(plain, &c.spec, devices).await;
        c.received.clear();
        c.released.clear();
        return;
    }
    let Some(conn) = c.conn.as_mut() else { return };
    let sent = match op {
        Op::Publish { topic, payload_len, payload: kind, qos, pkid, retain, .. } => {
            // rumqttd's encoder takes topics up to 65,535 bytes; the hub closes the connection past its limit.
            let body = payload(*kind, *payload_len);
            conn.try_send(raw_publish(topic, &body, *qos, *pkid, *retain)).await
        }
        Op::Subscribe { pkid, filters, .. } => {
            let filters: Vec<(&str, QoS)> = filters.iter().map(|(f, q)| (f.as_str(), qos(*q))).collect();
            conn.try_send(raw_subscribe(*pkid, &filters)).await
        }
        Op::Unsubscribe { pkid, filters, .. } => {
            conn.try_send(Packet::Unsubscribe(Unsubscribe { pkid: *pkid, filters: filters.clone() }, None)).await
        }
        Op::Ack { pick, invent, .. } => {
            let target = match invent {
                Some(pkid) => Some((1 + (*pkid % 2) as u8, *pkid)),
                None if c.received.is_empty() => None,
                None => Some(c.received.remove(pick % c.received.len())),
            };
            match target {
                Some((1, pkid)) => {
                    conn.try_send(Packet::PubAck(PubAck { pkid, reason: PubAckReason::Success }, None)).await
                }
                Some((_, pkid)) => {
                    conn.try_send(Packet::PubRec(PubRec { pkid, reason: PubRecReason::Success }, None)).await
                }
                None => Ok(()),
            }
        }
        Op::PubRel { pkid, .. } => {
            conn.try_send(Packet::PubRel(PubRel { pkid: *pkid, reason: PubRelReason::Success }, None)).await
        }
        Op::PubComp { pick, .. } => {
            let pkid =
                if c.released.is_empty() { 1 + *pick as u16 } else { c.released.remove(pick % c.released.len()) };
            conn.try_send(Packet::PubComp(PubComp { pkid, reason: PubCompReason::Success }, None)).await
        }
        Op::Read { .. } => Ok(()),
        Op::Garbage { bytes, .. } => conn.send_bytes(bytes).await,
        Op::Disconnect { .. } => {
            let bye = Disconnect { reason_code: DisconnectReasonCode::NormalDisconnection };
            let _ = conn.try_send(Packet::Disconnect(bye, None)).await;
            c.conn = None;
            return;
        }
        Op::Drop { .. } => {
            c.conn = None;
            return;
        }
        Op::Reconnect { .. } => Ok(()),
    };
    if sent.is_err() {
        c.conn = None;
        return;
    }
    let wait = if matches!(op, Op::Read { .. }) { Duration::from_millis(2) } else { Duration::ZERO };
    absorb(c, wait).await;
}

/// A subscriber and a publisher that prove, after each sequence, that the router routes: the
/// subscriber's session is persistent, so the message crosses the router (a clean session's would
/// not; the sequences' own clients, mostly clean, cover that path).
struct Probe {
    sub: RawClient,
    publisher: RawClient,
    n: u64,
}

impl Probe {
    async fn new(plain: std::net::SocketAddr) -> Probe {
        // Keepalive 0: a long run must not time the probes out.
        let connect = |id: &'static str, clean: bool| async move {
            let mut c = RawClient::connect_plain(plain).await.unwrap();
            c.connect_full(id, Some(("fuzz-admin", "admin-password")), 0, clean, None).await;
            match c.recv(Duration::from_secs(10)).await {
                Some(Packet::ConnAck(ack, _)) => assert_eq!(ack.code, rumqttd::protocol::ConnectReturnCode::Success),
                other => panic!("probe {id}: {other:?}"),
            }
            c
        };
        let mut sub = connect("fuzz-probe-sub", false).await;
        sub.send(raw_subscribe(1, &[("probe/+", QoS::AtMostOnce)])).await;
        while !matches!(sub.recv(Duration::from_secs(10)).await, Some(Packet::SubAck(..))) {}
        Probe { sub, publisher: connect("fuzz-probe-pub", true).await, n: 0 }
    }

    /// Whether a fresh message goes from the publisher to the subscriber within 10 s.
    async fn routes(&mut self) -> bool {
        self.n += 1;
        let body = self.n.to_string();
        if self.publisher.try_send(raw_publish("probe/n", body.as_bytes(), 0, 0, false)).await.is_err() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.sub.read(deadline.saturating_duration_since(Instant::now())).await {
                Read::Packet(Packet::Publish(p, _)) if p.payload == body.as_bytes() => return true,
                Read::Packet(_) => {}
                Read::Closed | Read::Silent => return false,
            }
        }
    }
}

/// Connections the hub's router closed on its own so far (from the control socket).
async fn router_drops(hub: &TestHub) -> u64 {
    let data = hub.data_dir.clone();
    tokio::task::spawn_blocking(move || domoticpi::control::request(&data, &domoticpi::control::Request::Stats))
        .await
        .unwrap()
        .expect("no answer on the control socket")
        .stats
        .expect("no stats")
        .router_drops
}

fn seed() -> u64 {
    match std::env::var("DOMOTICPI_FUZZ_SEED").as_deref() {
        Ok("random") => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
        Ok(s) => s.parse().expect("DOMOTICPI_FUZZ_SEED: a number or `random`"),
        Err(_) => FIXED_SEED,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn random_sequences_never_stop_the_router() {
    let seed = seed();
    let sequences: u64 =
        std::env::var("DOMOTICPI_FUZZ_SEQUENCES").ok().and_then(|s| s.parse().ok()).unwrap_or(SEQUENCES);
    eprintln!("fuzz: seed {seed}, {sequences} sequences (DOMOTICPI_FUZZ_SEED={seed} replays them)");
    let config = format!(
        "plain_listen = \"127.0.0.1:0\"\nmax_payload_bytes = 16384\n{DEVICES}[[scene]]\nid = \"evening\"\nset = {{ d1 = {{ on = true }} }}\n"
    );
    let mut hub = TestHub::start(&config).await;
    hub.add_cheap_user("fuzz-admin", Role::Admin, "admin-password");
    hub.add_cheap_user("fuzz-resident", Role::Resident, "resident-password");
    let devices: Vec<String> =
        ["d1", "d2", "d3"].iter().map(|d| hub.device_creds(d, false)["password"].clone()).collect();
    let mut plain = hub.plain.unwrap();
    let mut probe = Probe::new(plain).await;
    let mut rng = Xorshift::new(seed);
    let started = Instant::now();
    let mut ops_run = 0u64;
    for sequence in 0..sequences {
        // A restart now and then: what the sequences left on disk (retained messages) is restored
        // through the guard, and the router's memory of filters starts afresh.
        if sequence > 0 && sequence % RESTART_EVERY == 0 {
            drop(probe);
            hub = hub.restart(&config).await;
            plain = hub.plain.unwrap();
            probe = Probe::new(plain).await;
        }
        let specs: Vec<Spec> = (0..1 + rng.below(4)).map(|_| spec(&mut rng)).collect();
        let ops: Vec<Op> = (0..5 + rng.below(36)).map(|_| op(&mut rng, specs.len())).collect();
        let described = format!("{specs:#?}");
        let mut clients = Vec::new();
        for spec in specs {
            let conn = connect(plain, &spec, &devices).await;
            clients.push(Live { spec, conn, received: Vec::new(), released: Vec::new() });
        }
        for op in &ops {
            run_op(op, &mut clients, plain, &devices).await;
        }
        ops_run += ops.len() as u64;
        drop(clients);
        let hub_runs = !hub.task.as_ref().is_some_and(|t| t.is_finished());
        let failure = if !hub_runs {
            Some("stopped".to_owned())
        } else if !probe.routes().await {
            Some("unable to route".to_owned())
        } else {
            // The router never closes a connection on its own while the guard holds.
            let drops = router_drops(&hub).await;
            (drops > 0).then(|| format!("with {drops} connections the router closed on its own"))
        };
        if let Some(failure) = failure {
            panic!(
                "sequence {sequence} (seed {seed}) left the hub {failure}\nclients: {described}\noperations: {ops:#?}"
            );
        }
        if sequence % 500 == 499 {
            eprintln!(
                "fuzz: {} sequences, {:.0} per second",
                sequence + 1,
                (sequence + 1) as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let took = started.elapsed().as_secs_f64();
    eprintln!(
        "fuzz: {sequences} sequences, {ops_run} operations in {took:.1} s ({:.0} sequences per second); the router routed after each",
        sequences as f64 / took
    );
    hub.stop().await.unwrap();
}

//! What logins cost a broker: memory after a long churn of fresh client ids (a dashboard that
//! reconnects with a random id), and a device's CONNACK time during a flood of wrong passwords.
//!
//! Both speak MQTT 3.1.1 by hand (a CONNECT is a few bytes), so that the clients cost little next
//! to the broker and the flood can come from a second loopback address (127.0.0.2): the hub shares
//! its password checks out by address, as it would between hosts on a LAN.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::broker::Broker;
use crate::client::Target;
use crate::scenarios::{summarize, Outcome};

/// Where the flood comes from.
const ATTACKER: [u8; 4] = [127, 0, 0, 2];

/// How long a connect may take before it counts as failed.
const ANSWER: Duration = Duration::from_secs(40);

/// A CONNECT packet: MQTT 3.1.1, clean session, keepalive 60 s, with a login.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let field = |s: &str, out: &mut Vec<u8>| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut body = Vec::new();
    field("MQTT", &mut body);
    body.extend_from_slice(&[4, 0b1100_0010, 0, 60]);
    field(client_id, &mut body);
    field(user, &mut body);
    field(password, &mut body);
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Sends CONNECT and reads the CONNACK's return code (`None`: closed without one); then
/// DISCONNECT when it was accepted.
async fn log_in<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, connect: &[u8]) -> Result<Option<u8>> {
    stream.write_all(connect).await?;
    let mut ack = [0u8; 4];
    match stream.read_exact(&mut ack).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    if ack[0] != 0x20 {
        bail!("expected CONNACK, got packet type {:#x}", ack[0]);
    }
    if ack[3] == 0 {
        stream.write_all(&[0xE0, 0]).await?;
    }
    Ok(Some(ack[3]))
}

async fn tcp_from(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let stream = match from {
        Some(ip) => {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
        None => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One TLS login from `from`; the time to its CONNACK and its return code.
async fn tls_login(target: &Target, from: Option<IpAddr>, connect: &[u8]) -> Result<(Duration, Option<u8>)> {
    let started = Instant::now();
    let tcp = tcp_from(target.tls, from).await?;
    let connector = tokio_rustls::TlsConnector::from(target.tls_config.clone());
    let name = rustls::pki_types::ServerName::IpAddress(target.tls.ip().into());
    let code = match connector.connect(name, tcp).await {
        Ok(mut tls) => log_in(&mut tls, connect).await?,
        // Closed before or during the handshake (the hub's limits on sockets and logins in progress).
        Err(_) => None,
    };
    Ok((started.elapsed(), code))
}

/// The broker's RSS `settle` after what happened, in KiB.
async fn rss_after(broker: &mut Broker, settle: Duration) -> Result<u64> {
    tokio::time::sleep(settle).await;
    broker.rss_kib()
}

/// RSS after `count` plain connects, each with a fresh client id (logged in, then DISCONNECT),
/// `workers` at a time; and how the RSS grows per 1,000 ids between the first tenth and the end
/// (after the warm-up, and after the hub's memory trimmer ran).
pub async fn churn(
    broker: &mut Broker,
    target: &Target,
    count: u64,
    workers: u64,
    settle: Duration,
) -> Result<Outcome> {
    let (user, password) = target.churn.clone();
    let before = rss_after(broker, Duration::from_secs(2)).await?;
    let started = Instant::now();
    let tenth = count / 10;
    let run = |range: std::ops::Range<u64>| {
        let (user, password, plain) = (user.clone(), password.clone(), target.plain);
        let failed = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let (user, password, failed, range) =
                    (user.clone(), password.clone(), Arc::clone(&failed), range.clone());
                tokio::spawn(async move {
                    for n in range.filter(|n| n % workers == w) {
                        let id = format!("churn-{n:x}-{:x}", crate::now_nanos_since_epoch() & 0xffff_ffff);
                        let ok = async {
                            let mut tcp = tcp_from(plain, None).await?;
                            anyhow::Ok(log_in(&mut tcp, &connect_packet(&id, &user, &password)).await? == Some(0))
                        };
                        if !matches!(tokio::time::timeout(ANSWER, ok).await, Ok(Ok(true))) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await?;
            }
            anyhow::Ok(failed.load(Ordering::Relaxed))
        }
    };
    let mut failed = run(0..tenth).await?;
    let at_tenth = rss_after(broker, settle).await?;
    let churn_started = Instant::now();
    failed += run(tenth..count).await?;
    let rate = (count - tenth) as f64 / churn_started.elapsed().as_secs_f64();
    let after = rss_after(broker, settle).await?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut out = Outcome::default();
    out.push("RSS before the churn (MiB)", mib(before), 1);
    out.push(format!("RSS after {count} connects with fresh client ids (MiB)"), mib(after), 1);
    let per_thousand = (after as f64 - at_tenth as f64) / ((count - tenth) as f64 / 1000.0);
    out.push("RSS growth per 1,000 more fresh ids (KiB)", per_thousand, 1);
    out.push("fresh-id connects/s (plain, login, DISCONNECT)", rate, 0);
    if failed > 0 {
        out.notes.push(format!("churn: {failed} of {count} connects failed"));
    }
    let _ = started;
    Ok(out)
}

/// A device's CONNACK time over TLS, `samples` times idle and `samples` times during a flood of
/// `flood` TLS CONNECTs with wrong passwords from 127.0.0.2, `concurrency` at a time.
pub async fn flood(
    target: &Target,
    device: (&str, &str),
    flood: u64,
    concurrency: u64,
    samples: usize,
) -> Result<Outcome> {
    let device_connect = connect_packet(device.0, device.0, device.1);
    let mut idle = Vec::new();
    for _ in 0..samples {
        let (took, code) = tls_login(target, None, &device_connect).await?;
        if code != Some(0) {
            bail!("the device was refused while idle ({code:?})");
        }
        idle.push(took.as_nanos() as u64);
    }
    let answers = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let next = Arc::new(AtomicU64::new(0));
    let flood_started = Instant::now();
    let attackers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (target, answers, next, user) =
                (target.clone(), Arc::clone(&answers), Arc::clone(&next), target.user.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < flood {
                    let connect =
                        connect_packet(&format!("guess-{}", crate::now_nanos_since_epoch()), &user, "wrong-password");
                    let answer =
                        match tokio::time::timeout(ANSWER, tls_login(&target, Some(IpAddr::from(ATTACKER)), &connect))
                            .await
                        {
                            Ok(Ok((_, Some(code)))) => format!("CONNACK {code}"),
                            Ok(Ok((_, None))) => "closed".to_owned(),
                            Ok(Err(_)) => "error".to_owned(),
                            Err(_) => "no answer in 40 s".to_owned(),
                        };
                    if let Ok(mut a) = answers.lock() {
                        *a.entry(answer).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    // The device comes once the flood is under way.
    while next.load(Ordering::Relaxed) < concurrency.min(flood) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut during = Vec::new();
    let mut refused = 0;
    for _ in 0..samples {
        let (took, code) = tls_login(target, None, &device_connect).await?;
        if code == Some(0) {
            during.push(took.as_nanos() as u64);
        } else {
            refused += 1;
        }
        if next.load(Ordering::Relaxed) >= flood {
            break;
        }
    }
    for a in attackers {
        a.await.context("a flood task failed")?;
    }
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let idle = summarize(&mut idle).ok_or_else(|| anyhow!("no idle sample"))?;
    let mut out = Outcome::default();
    out.push("device CONNACK idle, p50 (ms)", idle.p50, 2);
    out.push("device CONNACK idle, max (ms)", idle.max, 2);
    match summarize(&mut during) {
        Some(d) => {
            out.push(format!("device CONNACK during {flood} wrong logins, p50 (ms)"), d.p50, 2);
            out.push(format!("device CONNACK during {flood} wrong logins, max (ms)"), d.max, 2);
        }
        None => out.notes.push("flood: the device never connected during the flood".to_owned()),
    }
    out.push(format!("{flood} wrong logins ({concurrency} at a time) took (s)"), flood_secs, 1);
    if refused > 0 {
        out.notes.push(format!("flood: the device was refused {refused} times"));
    }
    let answers = answers.lock().map(|a| format!("{a:?}")).unwrap_or_default();
    out.notes.push(format!("flood answers: {answers}"));
    Ok(out)
}

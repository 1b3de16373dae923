//! The page in a real headless Chromium, driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`; skipped without them unless `DOMOTICPI_REQUIRE_TOOLS=1`): sign in, watch a
//! sensor live, switch a light, arm and disarm with the code, the lockout after five wrong codes.
//! Screenshots of a phone-sized window go to `target/screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use domoticpi::store::users::Role;
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use rumqttc::QoS;

use crate::util::*;

const DEVICES: &str = "[alarm]\nexit_delay_s = 0\n\
[[room]]\nid = \"hall\"\nname = \"Hall\"\n\
[[device]]\nid = \"hall-motion\"\nkind = \"motion\"\nroom = \"hall\"\n\
[[device]]\nid = \"hall-light\"\nkind = \"light\"\nroom = \"hall\"\n\
[[device]]\nid = \"front-door\"\nkind = \"contact\"\nzone = \"entry\"\nroom = \"hall\"\n\
[[scene]]\nid = \"evening\"\nset = { hall-light = { on = true, brightness = 80 } }\n";

/// chromedriver, killed when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A headless Chromium with a phone's window, or `None` when it is not installed.
async fn chromium() -> Option<(Driver, Browser)> {
    if !have_tool("chromedriver") || !have_tool("chromium") {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let driver = Driver(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let caps = serde_json::json!({
        "browserName": "chrome",
        // The hub's certificate is signed by its own CA, which this browser does not know.
        "acceptInsecureCerts": true,
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=390,844"],
        },
    });
    let caps = caps.as_object().unwrap().clone().into_iter().collect();
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let browser = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("no WebDriver session");
    Some((driver, browser))
}

/// Waits until the text of `css` satisfies `ok`; returns it.
async fn text_until(b: &Browser, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(e) = b.find(Locator::Css(css)).await {
            if let Ok(text) = e.text().await {
                if ok(&text) {
                    return text;
                }
            }
        }
        assert!(Instant::now() < deadline, "{css} never showed what was expected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(b: &Browser, css: &str) {
    b.find(Locator::Css(css)).await.unwrap_or_else(|_| panic!("no {css}")).click().await.unwrap();
}

async fn type_into(b: &Browser, css: &str, text: &str) {
    let e = b.find(Locator::Css(css)).await.unwrap_or_else(|_| panic!("no {css}"));
    e.clear().await.unwrap();
    e.send_keys(text).await.unwrap();
}

async fn screenshot(b: &Browser, name: &str) {
    let png = b.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), png).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resident_uses_the_house_page_in_a_real_browser() {
    let Some((_driver, b)) = chromium().await else { return };
    let hub = TestHub::start(DEVICES).await;
    hub.add_cheap_user("alice", Role::Resident, "alice-password");
    let pin = domoticpi::auth::hash(&domoticpi::secret::Secret::new("4821"));
    domoticpi::store::users::set_pin(&hub.db(), "alice", &pin).unwrap();
    hub.wait_ready().await;
    for id in ["hall-motion", "hall-light"] {
        hub.set_device_password(id, "secret");
    }
    let motion = hub.device("hall-motion", "secret").await.unwrap();
    let mut light = hub.device("hall-light", "secret").await.unwrap();
    light.subscribe("dpi/hall-light/set", QOS1).await;

    let started = Instant::now();
    b.goto(&format!("https://{}/", hub.web.unwrap())).await.unwrap();
    type_into(&b, "#user", "alice").await;
    type_into(&b, "#password", "alice-password").await;
    click(&b, "#signin-form button[type=submit]").await;
    text_until(&b, "#alarm-state", |t| t.eq_ignore_ascii_case("disarmed")).await;
    text_until(&b, ".device[data-device=\"hall-motion\"] .name", |t| t == "hall-motion").await;
    println!("sign-in to the house page rendered: {:?}", started.elapsed());
    screenshot(&b, "house.png").await;

    // A sensor's state, live.
    motion.client.publish("dpi/hall-motion/state", QoS::AtLeastOnce, false, r#"{"motion":true}"#).await.unwrap();
    text_until(&b, ".device[data-device=\"hall-motion\"] .state", |t| t.contains("motion: true")).await;

    // A light switched from the page reaches the light.
    click(&b, "#switch-hall-light").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let p = light.recv(10).await;
        if &p.payload[..] == br#"{"on":true}"# {
            break;
        }
        assert!(Instant::now() < deadline);
    }

    // Arming with the front door open is refused, the door named.
    hub.set_device_password("front-door", "secret");
    let door = hub.device("front-door", "secret").await.unwrap();
    door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, false, "OPEN").await.unwrap();
    text_until(&b, ".device[data-device=\"front-door\"] .state", |t| t.contains("OPEN") || t.contains("open")).await;
    click(&b, "#keypad button[data-action=arm_away]").await;
    text_until(&b, "#alarm-message", |t| t.contains("arm_refused") && t.contains("front-door")).await;
    door.client.publish("dpi/front-door/state", QoS::AtLeastOnce, false, "CLOSED").await.unwrap();
    text_until(&b, ".device[data-device=\"front-door\"] .state", |t| t.contains("CLOSED") || t.contains("closed"))
        .await;

    // Arm, then disarm with the code.
    click(&b, "#keypad button[data-action=arm_away]").await;
    text_until(&b, "#alarm-state", |t| t.eq_ignore_ascii_case("armed away")).await;
    type_into(&b, "#code", "4821").await;
    click(&b, "#keypad button[data-action=disarm]").await;
    text_until(&b, "#alarm-state", |t| t.eq_ignore_ascii_case("disarmed")).await;

    // Five wrong codes: the lockout is shown.
    click(&b, "#keypad button[data-action=arm_away]").await;
    text_until(&b, "#alarm-state", |t| t.eq_ignore_ascii_case("armed away")).await;
    for _ in 0..5 {
        type_into(&b, "#code", "0000").await;
        click(&b, "#keypad button[data-action=disarm]").await;
    }
    // With its end.
    text_until(&b, "#alarm-lockout", |t| t.contains("locked") && t.contains("until")).await;
    let alarm = b.find(Locator::Css("#alarm")).await.unwrap();
    let png = alarm.screenshot().await.unwrap();
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::write(dir.join("keypad.png"), png).unwrap();
    b.close().await.unwrap();
    hub.stop().await.unwrap();
}

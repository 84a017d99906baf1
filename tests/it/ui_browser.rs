//! The status page in a real browser: headless Chromium (Debian's `chromium`) driven over
//! WebDriver by `chromedriver` (Debian's `chromium-driver`), against an in-process server with
//! the mission's mixed-traffic example. It takes screenshots (target/ui/), checks that legacy-db
//! is shown plaintext with its reason and inventory-service mTLS, prepares a root and waits for
//! the page to show it without a reload, and runs axe-core (from the npm registry, installed by
//! tools/ui-tests.sh) in the same page: no serious or critical violation.
//!
//! Ignored under a plain `cargo test`; `tools/ui-tests.sh` (part of tools/test.sh) runs it, and
//! without Chromium, chromedriver or axe-core it fails saying which is missing.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshid::state::DirStore;
use serde_json::{json, Value};

use crate::{
    rotation_server::prepare_generated,
    ui::{mixed_server, proxies},
};

fn need(var: &str, default: &str, what: &str) -> PathBuf {
    let p = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.to_owned()));
    assert!(
        p.exists(),
        "{what} not found at {} (set {var}); tools/ui-tests.sh installs and names it: apt-get install chromium chromium-driver, npm install axe-core",
        p.display()
    );
    p
}

/// chromedriver on a free loopback port, stopped on drop.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start(binary: &PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let d = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = d.try_call("GET", "/status", None).await {
                if v["value"]["ready"] == true {
                    return d;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .unwrap();
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!("WebDriver {method} {path}: HTTP {status}: {v}"))
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.try_call(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// One browser session.
struct Session<'a> {
    d: &'a Driver,
    id: String,
}

impl Session<'_> {
    async fn js(&self, script: &str) -> Value {
        self.d
            .call(
                "POST",
                &format!("/session/{}/execute/sync", self.id),
                Some(json!({"script": script, "args": []})),
            )
            .await["value"]
            .clone()
    }

    async fn js_async(&self, script: &str) -> Value {
        self.d
            .call(
                "POST",
                &format!("/session/{}/execute/async", self.id),
                Some(json!({"script": script, "args": []})),
            )
            .await["value"]
            .clone()
    }

    async fn screenshot(&self, name: &str) -> PathBuf {
        let v = self
            .d
            .call("GET", &format!("/session/{}/screenshot", self.id), None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v["value"].as_str().unwrap())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("ui_browser: screenshot {}", path.display());
        path
    }

    /// Waits until `script` (an expression) is true in the page.
    async fn until(&self, what: &str, expr: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.js(&format!("return !!({expr});")).await == true {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium, chromedriver and axe-core: run tools/ui-tests.sh"]
async fn the_page_in_chromium_shows_the_mesh_and_a_rotation_live_and_passes_axe() {
    let chromium = need("MESHID_CHROMIUM", "/usr/bin/chromium", "Chromium");
    let chromedriver = need(
        "MESHID_CHROMEDRIVER",
        "/usr/bin/chromedriver",
        "chromedriver",
    );
    let axe_js = need(
        "MESHID_AXE_JS",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/ui/node_modules/axe-core/axe.min.js"
        ),
        "axe-core",
    );
    let server = mixed_server().await;
    let _proxies = proxies(&server).await;
    let driver = Driver::start(&chromedriver).await;
    let created = driver
        .call(
            "POST",
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1280,2400"]
                }
            }}})),
        )
        .await;
    let s = Session {
        d: &driver,
        id: created["value"]["sessionId"].as_str().unwrap().to_owned(),
    };
    let url = format!("http://{}/ui", server.running.http_addr);
    driver
        .call(
            "POST",
            &format!("/session/{}/url", s.id),
            Some(json!({"url": url})),
        )
        .await;
    // The script ran (it says so in the live region) and the proxies' proofs are shown.
    s.until(
        "the live updates started",
        "document.getElementById('live').textContent.startsWith('live')",
        Duration::from_secs(10),
    )
    .await;
    let inventory_row = "document.querySelector('tr[data-endpoint=\"10.244.1.11:8080\"]')";
    s.until(
        "inventory-service shown mTLS",
        &format!("{inventory_row} && {inventory_row}.innerText.includes('mTLS')"),
        Duration::from_secs(10),
    )
    .await;
    let legacy = s
        .js("return document.querySelector('tr[data-endpoint=\"10.244.2.20:5432\"]').innerText;")
        .await;
    let legacy = legacy.as_str().unwrap_or_default();
    assert!(legacy.contains("plaintext"), "{legacy}");
    assert!(
        legacy.contains("no sidecar"),
        "the reason is shown: {legacy}"
    );
    // The reason is also on hover (the badge's title).
    let title = s
        .js("return document.querySelector('tr[data-endpoint=\"10.244.2.20:5432\"] .badge').title;")
        .await;
    assert!(title.as_str().unwrap().contains("no sidecar"), "{title}");
    let shot = s.screenshot("status-page.png").await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);

    // A root prepared on the server shows without a reload.
    s.js("window.__meshidNoReload = 42; return true;").await;
    prepare_generated(&DirStore::new(server.state_dir()));
    s.until(
        "the prepared root shown",
        "document.querySelector('#main').innerText.includes('prepared')",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(
        s.js("return window.__meshidNoReload;").await,
        42,
        "the page was updated in place, not reloaded"
    );
    assert!(s
        .js("return document.getElementById('rotation-summary').innerText;")
        .await
        .as_str()
        .unwrap()
        .contains("in progress"));
    s.screenshot("status-page-rotation.png").await;

    // axe-core in the same page: no serious or critical violation.
    let axe = std::fs::read_to_string(&axe_js).unwrap();
    s.js(&format!("{axe}\nreturn typeof axe;")).await;
    let result = s
        .js_async(
            "const done = arguments[arguments.length - 1];
             axe.run(document, {resultTypes: ['violations']})
               .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.length}))))
               .catch(e => done('axe failed: ' + e));",
        )
        .await;
    let violations = result
        .as_array()
        .unwrap_or_else(|| panic!("axe-core did not run: {result}"));
    eprintln!("ui_browser: axe-core violations: {result}");
    let bad: Vec<&Value> = violations
        .iter()
        .filter(|v| v["impact"] == "serious" || v["impact"] == "critical")
        .collect();
    assert!(bad.is_empty(), "serious accessibility violations: {bad:#?}");

    driver
        .call("DELETE", &format!("/session/{}", s.id), None)
        .await;
    server.running.shutdown().await;
}

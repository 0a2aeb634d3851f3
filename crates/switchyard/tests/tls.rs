//! TLS on both sides, with certificates made in the test: https workers (a CA the router is
//! told to trust, and workers that require a client certificate) and the router's own HTTPS
//! listener.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use axum::http::Request;
use http_body_util::{BodyExt, Full};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::json;
use switchyard::config::RouterConfig;
use switchyard::policies::PolicyKind;
use switchyard::proxy::client::new_client_with_tls;
use switchyard::server;
use switchyard::tls::{CertKeyPaths, TlsConfig};
use switchyard_sim::server::{spawn_worker, WorkerConfig, WorkerHandle};

/// A directory of PEM files: a CA, a server certificate it signed (localhost, 127.0.0.1), and
/// a client CA with a client certificate.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("switchyard-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |file: &str, text: String| std::fs::write(dir.join(file), text).unwrap();
        let ca = |cn: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let leaf = |sans: Vec<String>, issuer: &CertifiedIssuer<'_, KeyPair>, prefix: &str| {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans).unwrap().signed_by(&key, issuer).unwrap();
            write(&format!("{prefix}.pem"), cert.pem());
            write(&format!("{prefix}.key"), key.serialize_pem());
        };
        let server_ca = ca("switchyard test CA");
        write("ca.pem", server_ca.pem());
        leaf(vec!["localhost".into(), "127.0.0.1".into()], &server_ca, "server");
        let client_ca = ca("switchyard test client CA");
        write("client-ca.pem", client_ca.pem());
        leaf(vec!["router".into()], &client_ca, "client");
        Self { dir }
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    fn pair(&self, prefix: &str) -> CertKeyPaths {
        CertKeyPaths { cert: self.dir.join(format!("{prefix}.pem")), key: self.dir.join(format!("{prefix}.key")) }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn tls_sim(pki: &Pki, client_ca: bool) -> WorkerHandle {
    spawn_worker(WorkerConfig {
        time_scale: 100.0,
        tls_cert_path: Some(pki.path("server.pem")),
        tls_key_path: Some(pki.path("server.key")),
        tls_client_ca_path: client_ca.then(|| pki.path("client-ca.pem")),
        ..WorkerConfig::default()
    })
    .await
    .unwrap()
}

fn router_config(worker: &WorkerHandle, tls: TlsConfig) -> RouterConfig {
    let mut cfg = common::config(vec![worker.url()], PolicyKind::RoundRobin);
    cfg.tls = tls;
    cfg
}

async fn chat(router: &str) -> common::Answer {
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    common::post(&format!("{router}/v1/chat/completions"), &body).await
}

#[tokio::test]
async fn https_workers_are_reached_through_the_ca_the_router_is_given() {
    let pki = Pki::new("ca");
    let worker = tls_sim(&pki, false).await;
    assert!(worker.url().starts_with("https://"));
    let trusted = TlsConfig { worker_ca: Some(pki.dir.join("ca.pem")), ..TlsConfig::default() };
    let router = server::start(router_config(&worker, trusted)).await.unwrap();
    let r = chat(&router.url()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 3);
    router.shutdown().await.unwrap();

    // Without the CA the worker's certificate is not trusted: never healthy, a clear 503.
    let router = server::start(router_config(&worker, TlsConfig::default())).await.unwrap();
    let r = chat(&router.url()).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.json()["error"]["message"].is_string());
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn workers_that_require_a_client_certificate_get_the_router_s() {
    let pki = Pki::new("mtls");
    let worker = tls_sim(&pki, true).await;
    let ca = Some(pki.dir.join("ca.pem"));
    // Trusting the worker is not enough: it refuses a router without a certificate.
    let anonymous = TlsConfig { worker_ca: ca.clone(), ..TlsConfig::default() };
    let router = server::start(router_config(&worker, anonymous)).await.unwrap();
    assert_eq!(chat(&router.url()).await.status, 503);
    router.shutdown().await.unwrap();

    let identified = TlsConfig { worker_ca: ca, worker_identity: Some(pki.pair("client")), ..TlsConfig::default() };
    let router = server::start(router_config(&worker, identified)).await.unwrap();
    let r = chat(&router.url()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    router.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_router_serves_https_when_given_a_certificate() {
    let pki = Pki::new("listener");
    let worker = spawn_worker(WorkerConfig { time_scale: 100.0, ..WorkerConfig::default() }).await.unwrap();
    let mut cfg = common::config(vec![worker.url()], PolicyKind::RoundRobin);
    cfg.tls.listener = Some(pki.pair("server"));
    let router = server::start(cfg).await.unwrap();
    assert!(router.url().starts_with("https://127.0.0.1:"));

    let trusting =
        switchyard::tls::client_config(&TlsConfig { worker_ca: Some(pki.dir.join("ca.pem")), ..TlsConfig::default() })
            .unwrap();
    let client = new_client_with_tls(Duration::from_secs(5), 4, trusting);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).to_string();
    let req = Request::post(format!("{}/v1/chat/completions", router.url()))
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let resp = client.request(req).await.expect("an HTTPS answer");
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 2);

    // A client that does not trust the certificate gets no answer; plain HTTP gets none either.
    let untrusting = new_client_with_tls(Duration::from_secs(5), 4, switchyard::tls::default_client_config());
    let req = Request::get(format!("{}/health", router.url())).body(Full::default()).unwrap();
    assert!(untrusting.request(req).await.is_err());
    let plain = common::client();
    let req = Request::get(format!("http://{}/health", router.addr())).body(Full::default()).unwrap();
    assert!(plain.request(req).await.is_err());
    router.shutdown().await.unwrap();
}

#[test]
fn bad_tls_flags_fail_in_one_line() {
    use switchyard::config::{parse_args, ParseOutcome};
    let pki = Pki::new("flags");
    let cases: &[(&[&str], &str)] = &[
        (&["--tls-cert-path", &pki.path("server.pem")], "needs --tls-key-path"),
        (&["--worker-client-key", &pki.path("client.key")], "needs --worker-client-cert"),
        (&["--tls-cert-path", &pki.path("nope.pem"), "--tls-key-path", &pki.path("server.key")], "nope.pem"),
        (&["--worker-ca-cert", &pki.path("server.key")], "no PEM certificate"),
        (&["--tls-cert-path", &pki.path("server.pem"), "--tls-key-path", &pki.path("client.key")], "tls-cert-path"),
    ];
    for (args, expected) in cases {
        let argv = std::iter::once("switchyard").chain(args.iter().copied());
        match parse_args(argv) {
            ParseOutcome::Fail(line) => {
                assert!(line.contains(expected), "{args:?}: {line}");
                assert!(!line.contains('\n'), "{line}");
            }
            other => panic!("{args:?} accepted: {other:?}"),
        }
    }
    let ok = ["switchyard", "--tls-cert-path", &pki.path("server.pem"), "--tls-key-path", &pki.path("server.key")];
    assert!(matches!(parse_args(ok), ParseOutcome::Run(_)));
}

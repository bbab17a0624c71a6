//! TLS to upstreams, black-box: a provider whose certificate comes from a private CA is reached
//! only with that CA in `tls.ca_file`; a provider that demands a client certificate (mutual
//! TLS) is reached only with `tls.client_cert_file`/`client_key_file`; unreadable or
//! mismatched files are configuration errors naming the key. Certificates are made for the
//! test with the `openssl` command.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// A CA, a server certificate for `localhost`/127.0.0.1 and a client certificate, in `dir`.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let mut args = vec!["req", "-x509", "-days", "2", "-subj"];
        let subj = format!("/CN=aihub test {ca}");
        args.push(&subj);
        args.extend(ec);
        let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
        args.extend(["-keyout", &key, "-out", &pem]);
        run(&args);
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (who, cn) in [("server", "localhost"), ("client", "aihub-gateway")] {
        let subj = format!("/CN={cn}");
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let mut args = vec!["req", "-new", "-subj", &subj];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr]);
        run(&args);
        run(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }
}

fn gateway(dir: &Path, endpoint: &str, tls: &str, k: &TestKey) -> Gateway {
    let mut extra = vec![];
    if !tls.is_empty() {
        extra.push(tls);
    }
    let body = config(
        &[upstream("m", &[endpoint.to_owned()], &extra)],
        &[("gpt-4o", "m", None)],
        &[k],
    );
    // Relative TLS paths are read from the configuration file's directory.
    let body = body.replace("CERTS/", &format!("{}/", dir.display()));
    Gateway::start(&body, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_only_when_configured() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let c = |f: &str| certs.path().join(f).display().to_string();
    let mock = Mock::start(&[
        "--tls-cert",
        &c("server.pem"),
        "--tls-key",
        &c("server.key"),
    ]);
    let url = format!("https://localhost:{}/v1", mock.addr.port());
    let k = key("tls", &[]);

    let trusted = gateway(certs.path(), &url, "tls: {ca_file: CERTS/ca.pem}", &k);
    let r = trusted.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());

    // The system's CAs, or another private CA, do not vouch for it.
    for tls in ["", "tls: {ca_file: CERTS/other-ca.pem}"] {
        let gw = gateway(certs.path(), &url, tls, &k);
        let r = gw.chat(&k.key, &chat("gpt-4o")).await;
        assert_eq!(r.status(), 502, "{tls:?}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"]["message"].is_string(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_demanding_a_client_certificate_gets_one_when_configured() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let c = |f: &str| certs.path().join(f).display().to_string();
    let mock = Mock::start(&[
        "--tls-cert",
        &c("server.pem"),
        "--tls-key",
        &c("server.key"),
        "--tls-client-ca",
        &c("ca.pem"),
    ]);
    let url = format!("https://localhost:{}/v1", mock.addr.port());
    let k = key("mtls", &[]);

    let without = gateway(certs.path(), &url, "tls: {ca_file: CERTS/ca.pem}", &k);
    let r = without.chat(&k.key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 502, "refused without a client certificate");

    let with = gateway(
        certs.path(),
        &url,
        "tls: {ca_file: CERTS/ca.pem, client_cert_file: CERTS/client.pem, client_key_file: CERTS/client.key}",
        &k,
    );
    for stream in [false, true] {
        let mut body = chat("gpt-4o");
        body["stream"] = stream.into();
        let r = with.chat(&k.key, &body).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(!stream || text.ends_with("data: [DONE]\n\n"), "{text}");
    }
}

#[test]
fn unreadable_or_mismatched_tls_files_are_configuration_errors() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let k = key("tlsconf", &[]);
    for (tls, key_path, says) in [
        (
            "tls: {ca_file: CERTS/missing.pem}",
            "upstreams.m.tls.ca_file",
            "cannot read",
        ),
        (
            "tls: {ca_file: CERTS/server.ext}",
            "upstreams.m.tls.ca_file",
            "no PEM certificate",
        ),
        (
            "tls: {client_cert_file: CERTS/client.pem, client_key_file: CERTS/server.key}",
            "upstreams.m.tls.client_key_file",
            "does not match",
        ),
        (
            "tls: {client_cert_file: CERTS/client.pem}",
            "upstreams.m.tls.client_key_file",
            "needed with client_cert_file",
        ),
    ] {
        let body = config(
            &[upstream("m", &["https://localhost:1/v1".into()], &[tls])],
            &[("gpt-4o", "m", None)],
            &[&k],
        )
        .replace("CERTS/", &format!("{}/", certs.path().display()));
        let file = certs.path().join("gateway.yaml");
        write(&file, &body);
        let out = Command::new(BIN)
            .args(["gateway", "--check-config", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{tls}");
        assert!(err.contains(key_path) && err.contains(says), "{tls}: {err}");
        assert!(!err.contains("PRIVATE KEY"), "no key material in errors");
    }
}

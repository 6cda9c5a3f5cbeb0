//! Spans of the local secret store: named after the port method, with the secret's name, never
//! its value. In its own test binary: tracing caches per-callsite interest process-wide, so a
//! scoped subscriber is only reliable when no other test runs alongside.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use im_domain::TenantId;
use im_domain::secrets::{SecretName, SecretStore, SecretValue};
use im_secrets_local::{KEY_BYTES, LocalSecretStore};
use serde_json::json;

struct TestWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for TestWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn calls_are_traced_with_the_secret_name_and_never_its_value() {
    let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || TestWriter(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let dir = tempfile::tempdir().unwrap();
    let store = LocalSecretStore::open(dir.path(), &[5u8; KEY_BYTES]).unwrap();
    let name = SecretName::new(&TenantId::new("acme").unwrap(), "webhook", "w9");
    let reference = store.put(&name, &SecretValue(json!({"secret": "whsec_never_logged"})), &BTreeMap::new()).await.unwrap();
    store.get(&reference).await.unwrap();
    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    assert!(text.contains("secrets.put") && text.contains("secrets.get"), "{text}");
    assert!(text.contains(&name.to_string()), "{text}");
    assert!(!text.contains("whsec_never_logged"), "{text}");
}

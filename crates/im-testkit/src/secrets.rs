//! The contract of the [`SecretStore`] port: versions that stay readable, overwrite by new
//! version, missing secrets, deletion of every version, pruning of superseded versions, and
//! values that never print.

use std::collections::BTreeMap;
use std::fmt::Debug;

use im_domain::DomainError;
use im_domain::secrets::{SecretName, SecretRef, SecretStore, SecretValue};
use serde_json::json;

use crate::fresh_tenant;

/// A secret name no other check uses.
pub fn fresh_name() -> SecretName {
    SecretName::new(&fresh_tenant(), "webhook", &uuid::Uuid::new_v4().to_string())
}

/// A value whose text is unique, so a leak of it can be searched for.
fn value() -> (SecretValue, String) {
    let text = format!("whsec_{}", uuid::Uuid::new_v4().simple());
    (SecretValue(json!({"secret": text, "nested": {"list": [1, 2, 3]}})), text)
}

fn metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("kind".to_owned(), "webhook-signing-secret".to_owned())])
}

async fn put(store: &dyn SecretStore, name: &SecretName, value: &SecretValue) -> SecretRef {
    store.put(name, value, &metadata()).await.unwrap_or_else(|e| panic!("put MUST succeed on a reachable store: {e}"))
}

async fn get(store: &dyn SecretStore, reference: &SecretRef) -> SecretValue {
    store.get(reference).await.unwrap_or_else(|e| panic!("get MUST find the version put returned ({reference:?}): {e}"))
}

fn assert_not_found(result: Result<SecretValue, DomainError>, what: &str) {
    assert!(matches!(result, Err(DomainError::NotFound { .. })), "{what} MUST be NotFound, got {result:?}");
}

/// Runs every check of the secret store contract.
pub async fn contract<S: SecretStore + Debug>(store: &S) {
    put_get_and_overwrite(store).await;
    a_missing_secret_is_not_found(store).await;
    delete_removes_every_version_and_is_idempotent(store).await;
    prune_keeps_the_current_version_and_newer_ones(store).await;
    values_never_print(store).await;
}

/// A put returns a reference that reads the value back; a second put of the same name is a new
/// version, and the older version stays readable (an endpoint signs with it during a rotation).
pub async fn put_get_and_overwrite(store: &dyn SecretStore) {
    let name = fresh_name();
    let (first, _) = value();
    let (second, _) = value();
    let v1 = put(store, &name, &first).await;
    assert_eq!(v1.secret_name, name, "the reference MUST name the secret that was put");
    assert!(get(store, &v1).await == first, "get MUST return the value that was put");

    let v2 = put(store, &name, &second).await;
    assert_eq!(v2.secret_name, name);
    assert_ne!(v1.version, v2.version, "a second put of a name MUST be a new version");
    assert!(get(store, &v2).await == second, "the new version MUST read the new value");
    assert!(get(store, &v1).await == first, "an older version MUST keep its value");

    let other = fresh_name();
    let (third, _) = value();
    let v3 = put(store, &other, &third).await;
    assert!(get(store, &v3).await == third, "another name keeps its own value");
    assert!(get(store, &v1).await == first, "putting another name changes nothing here");
}

/// A name never stored, a version never issued, and a version of another name are `NotFound`.
pub async fn a_missing_secret_is_not_found(store: &dyn SecretStore) {
    let never = SecretRef { secret_name: fresh_name(), version: "1".into() };
    assert_not_found(store.get(&never).await, "a name never stored");

    let name = fresh_name();
    let stored = put(store, &name, &value().0).await;
    let unissued = SecretRef { secret_name: name, version: format!("{}9", stored.version) };
    assert_not_found(store.get(&unissued).await, "a version never issued");

    let elsewhere = SecretRef { secret_name: fresh_name(), version: stored.version };
    assert_not_found(store.get(&elsewhere).await, "the version of another name");
}

/// Deleting a name removes every version of it, and deleting what is absent succeeds.
pub async fn delete_removes_every_version_and_is_idempotent(store: &dyn SecretStore) {
    let name = fresh_name();
    let keep = fresh_name();
    let v1 = put(store, &name, &value().0).await;
    let v2 = put(store, &name, &value().0).await;
    let (kept_value, _) = value();
    let kept = put(store, &keep, &kept_value).await;

    store.delete(&name).await.unwrap_or_else(|e| panic!("delete MUST succeed: {e}"));
    assert_not_found(store.get(&v1).await, "a deleted secret's first version");
    assert_not_found(store.get(&v2).await, "a deleted secret's latest version");
    assert!(get(store, &kept).await == kept_value, "delete MUST NOT touch another name");

    store.delete(&name).await.unwrap_or_else(|e| panic!("deleting a deleted secret MUST succeed: {e}"));
    store.delete(&fresh_name()).await.unwrap_or_else(|e| panic!("deleting a secret never stored MUST succeed: {e}"));
}

/// Pruning at a version deletes the versions issued before it and keeps it, any version issued
/// after it, and other names; it is idempotent, a later prune makes up for one that never ran,
/// and pruning a name or version that does not exist succeeds.
pub async fn prune_keeps_the_current_version_and_newer_ones(store: &dyn SecretStore) {
    let name = fresh_name();
    let other = fresh_name();
    let v1 = put(store, &name, &value().0).await;
    let v2 = put(store, &name, &value().0).await;
    let (current, _) = value();
    let v3 = put(store, &name, &current).await;
    let (newer, _) = value();
    let v4 = put(store, &name, &newer).await;
    let (kept_value, _) = value();
    let kept = put(store, &other, &kept_value).await;

    store.prune(&v3).await.unwrap_or_else(|e| panic!("prune MUST succeed: {e}"));
    assert_not_found(store.get(&v1).await, "a version issued before the one pruned at");
    assert_not_found(store.get(&v2).await, "the version just before the one pruned at");
    assert!(get(store, &v3).await == current, "prune MUST keep the version it names");
    assert!(get(store, &v4).await == newer, "prune MUST keep a version issued after the one it names");
    assert!(get(store, &kept).await == kept_value, "prune MUST NOT touch another name");
    store.prune(&v3).await.unwrap_or_else(|e| panic!("pruning again MUST succeed: {e}"));
    assert!(get(store, &v3).await == current, "a second prune keeps the version too");

    // A prune that never ran (the process died after writing v5) is made up for by the next.
    let v5 = put(store, &name, &value().0).await;
    let (latest, _) = value();
    let v6 = put(store, &name, &latest).await;
    store.prune(&v6).await.unwrap_or_else(|e| panic!("prune MUST succeed: {e}"));
    for (old, what) in [(&v3, "v3"), (&v4, "v4"), (&v5, "v5")] {
        assert_not_found(store.get(old).await, what);
    }
    assert!(get(store, &v6).await == latest);
    let next = put(store, &name, &value().0).await;
    assert!(
        ![&v1, &v2, &v3, &v4, &v5, &v6].iter().any(|old| old.version == next.version),
        "a version number MUST NOT be issued again after a prune"
    );

    store
        .prune(&SecretRef { secret_name: fresh_name(), version: v3.version.clone() })
        .await
        .unwrap_or_else(|e| panic!("pruning a name never stored MUST succeed: {e}"));
    store.delete(&name).await.unwrap_or_else(|e| panic!("delete: {e}"));
    store.prune(&v6).await.unwrap_or_else(|e| panic!("pruning a deleted name MUST succeed: {e}"));
    assert_not_found(store.get(&next).await, "delete after prune removes the rest");
}

/// Neither a value, nor the store that holds it, nor a reference or an error shows the value.
pub async fn values_never_print<S: SecretStore + Debug + ?Sized>(store: &S) {
    let name = fresh_name();
    let (secret, text) = value();
    let reference = store.put(&name, &secret, &metadata()).await.unwrap_or_else(|e| panic!("put: {e}"));
    let read = store.get(&reference).await.unwrap_or_else(|e| panic!("get: {e}"));
    let missing = store.get(&SecretRef { secret_name: name.clone(), version: format!("{}9", reference.version) }).await;
    for (what, shown) in [
        ("the value put", format!("{secret:?}")),
        ("the value read", format!("{read:?} {read:#?}")),
        ("the reference", format!("{reference:?}")),
        ("the store", format!("{store:?} {store:#?}")),
        ("an error of the store", format!("{missing:?}")),
    ] {
        assert!(!shown.contains(&text) && !shown.contains("nested"), "{what} MUST NOT show the secret value: {shown}");
    }
}

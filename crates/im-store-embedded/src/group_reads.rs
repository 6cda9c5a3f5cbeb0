//! What a write of a group reads that a later write of the same group reads again: whether a
//! tenant has a webhook endpoint, and a provider's concurrency token. Every create of an
//! integration reads both (about a quarter of the writer's work a create: 10,000 instructions of
//! 38,000); the creates of one group are mostly for a few tenants and providers.
//!
//! The writes of a group ([`crate::db`]'s writer) run on the writer thread in one transaction,
//! which holds the database's write lock from its start: no other connection, of this process
//! or another, commits meanwhile, and every read of the group sees the database as it was at
//! the start plus the group's own changes. So a read kept here stays what the transaction would
//! read again until a write of the group changes what it read: every change to a document of
//! the containers read here forgets what was kept of that container ([`changed`]), and a write
//! rolled back to its savepoint forgets all of it (a read made after its changes would outlive
//! them). What is kept lives from the start of a group ([`begin`]) to its end ([`end`]), so the
//! next group, after which another process may have committed, reads afresh. Outside a group (a
//! migration, a reader connection, a test's own transaction) nothing is kept.

use std::cell::RefCell;

use im_domain::{DomainError, ETag};

use crate::containers::{PROVIDERS, WEBHOOKS};

/// Past this many tenants (or providers) in one group, further ones are read every time.
const MAX_KEPT: usize = 32;

/// The live provider found, if any: its concurrency token and expiry.
pub(crate) type LiveProvider = Option<(ETag, Option<i64>)>;

#[derive(Default)]
struct Kept {
    /// By tenant: whether it has a webhook endpoint.
    webhooks_of: Vec<(String, bool)>,
    /// By provider id: the live provider found when read at `read_at` (the store's clock), with its
    /// token and expiry.
    providers: Vec<(String, i64, LiveProvider)>,
}

thread_local! {
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// A group starts on this thread: reads are kept from now on.
pub(crate) fn begin() {
    KEPT.with(|kept| *kept.borrow_mut() = Some(Kept::default()));
}

/// The group's writes have run: nothing read is kept any longer.
pub(crate) fn end() {
    KEPT.with(|kept| *kept.borrow_mut() = None);
}

/// A write of the group changed a document of `container` (`None`: of any container).
pub(crate) fn changed(container: Option<&str>) {
    let webhooks = container.is_none_or(|c| c == WEBHOOKS);
    let providers = container.is_none_or(|c| c == PROVIDERS);
    if webhooks || providers {
        KEPT.with(|kept| {
            if let Some(kept) = kept.borrow_mut().as_mut() {
                if webhooks {
                    kept.webhooks_of.clear();
                }
                if providers {
                    kept.providers.clear();
                }
            }
        });
    }
}

/// Whether `tenant` has a webhook endpoint: as kept by this group, else `read`.
pub(crate) fn has_webhooks(tenant: &str, read: impl FnOnce() -> Result<bool, DomainError>) -> Result<bool, DomainError> {
    let known = KEPT.with(|kept| kept.borrow().as_ref().map(|k| k.webhooks_of.iter().find(|(t, _)| t == tenant).map(|(_, has)| *has)));
    match known {
        Some(Some(has)) => Ok(has),
        Some(None) => {
            let has = read()?;
            keep(|k| &mut k.webhooks_of, (tenant.to_owned(), has));
            Ok(has)
        }
        None => read(),
    }
}

/// The token of the live provider `id` at `now`: as kept by this group when it was
/// read at `now` or before (a provider live then is live now unless it expired since, and
/// none that was not can be now), else `read`, which gives the live provider's token and
/// expiry.
pub(crate) fn provider_etag(
    id: &str,
    now: i64,
    read: impl FnOnce() -> Result<LiveProvider, DomainError>,
) -> Result<Option<ETag>, DomainError> {
    let live = |found: &LiveProvider| found.as_ref().map(|(etag, _)| etag.clone());
    let known = KEPT.with(|kept| {
        kept.borrow().as_ref().map(|k| {
            k.providers
                .iter()
                .find(|(p, read_at, _)| p == id && *read_at <= now)
                // One that has expired since is read again (another may be live now).
                .filter(|(_, _, found)| found.as_ref().is_none_or(|(_, expires)| expires.is_none_or(|at| at > now)))
                .map(|(_, _, found)| live(found))
        })
    });
    match known {
        Some(Some(etag)) => Ok(etag),
        Some(None) => {
            let found = read()?;
            let etag = live(&found);
            keep(|k| &mut k.providers, (id.to_owned(), now, found));
            Ok(etag)
        }
        None => Ok(live(&read()?)),
    }
}

/// Keeps `entry` in the list `of` picks, replacing an entry of the same key (a provider read
/// again after it expired), while it holds fewer than [`MAX_KEPT`].
fn keep<T: Keyed>(of: impl FnOnce(&mut Kept) -> &mut Vec<T>, entry: T) {
    KEPT.with(|kept| {
        if let Some(kept) = kept.borrow_mut().as_mut() {
            let list = of(kept);
            list.retain(|e| e.key() != entry.key());
            if list.len() < MAX_KEPT {
                list.push(entry);
            }
        }
    });
}

trait Keyed {
    fn key(&self) -> &str;
}

impl Keyed for (String, bool) {
    fn key(&self) -> &str {
        &self.0
    }
}

impl Keyed for (String, i64, LiveProvider) {
    fn key(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etag(s: &str) -> LiveProvider {
        Some((ETag::new(s.to_owned()), None))
    }

    #[test]
    fn nothing_is_kept_outside_a_group() {
        let mut reads = 0;
        for _ in 0..2 {
            assert!(
                has_webhooks("t", || {
                    reads += 1;
                    Ok(true)
                })
                .unwrap()
            );
        }
        assert_eq!(reads, 2);
    }

    #[test]
    fn a_read_is_kept_until_its_container_changes_or_the_group_ends() {
        begin();
        let mut reads = 0;
        let mut read = |has| {
            has_webhooks("t", || {
                reads += 1;
                Ok(has)
            })
            .unwrap()
        };
        assert!(!read(false));
        assert!(!read(true), "kept");
        changed(Some(crate::containers::INTEGRATIONS));
        assert!(!read(true), "another container's change keeps it");
        changed(Some(WEBHOOKS));
        assert!(read(true), "read again after an endpoint changed");
        changed(None);
        assert!(!read(false), "read again after any change");
        end();
        assert!(read(true), "read again in the next group");
        assert_eq!(reads, 4);
    }

    #[test]
    fn a_provider_is_kept_while_it_is_live_and_read_again_once_it_expires() {
        begin();
        let expiring = Some((ETag::new("v1".to_owned()), Some(1_000)));
        assert_eq!(provider_etag("p", 500, || Ok(expiring.clone())).unwrap(), Some(ETag::new("v1".to_owned())));
        assert_eq!(provider_etag("p", 900, || panic!("kept")).unwrap(), Some(ETag::new("v1".to_owned())));
        assert_eq!(provider_etag("p", 1_000, || Ok(None)).unwrap(), None, "expired: read again");
        assert_eq!(provider_etag("p", 2_000, || panic!("kept absent")).unwrap(), None);
        assert_eq!(provider_etag("p", 900, || Ok(etag("earlier"))).unwrap(), Some(ETag::new("earlier".to_owned())), "earlier than kept");
        changed(Some(PROVIDERS));
        assert_eq!(provider_etag("p", 2_000, || Ok(etag("v2"))).unwrap(), Some(ETag::new("v2".to_owned())));
        end();
    }
}

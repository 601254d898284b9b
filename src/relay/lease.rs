//! Cursor leases in a JetStream key-value bucket: who of the fleet reads a worker's cursor.
//!
//! The bucket's `max_age` is the lease's lifetime (`relay.lease_ttl_ms`): JetStream drops an
//! entry nobody renewed, so a killed owner's lease ends on its own. Taking a lease is
//! `create` (it exists only if nobody holds it: never written, expired, or released);
//! renewing is `update` at the revision we wrote last, which fails the moment anybody else
//! wrote the key, so an owner learns it lost the lease at its next renewal (every third of
//! the lifetime) at the latest.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use tokio::time::Instant;

/// A lease this instance holds.
pub struct Lease {
    store: kv::Store,
    key: String,
    revision: u64,
    value: Bytes,
    ttl: Duration,
    /// When the last renewal (or the taking) was acknowledged: JetStream keeps the entry for
    /// `ttl` after it.
    renewed: Instant,
}

/// What a renewal found.
pub enum Renewal {
    /// Still ours.
    Held,
    /// Could not ask NATS, but the lease cannot have expired yet.
    Unsure,
    /// Somebody else holds it, or it expired before we could renew it.
    Lost,
}

impl Lease {
    /// The lease written at `revision` by a request sent at `asked`.
    fn held(
        store: &kv::Store,
        key: &str,
        revision: u64,
        value: Bytes,
        ttl: Duration,
        asked: Instant,
    ) -> Lease {
        Lease {
            store: store.clone(),
            key: key.to_owned(),
            revision,
            value,
            ttl,
            // Counted from the request: the entry may have been written as it was sent.
            renewed: asked,
        }
    }

    /// Takes the lease on `key` if nobody holds it. `Err` only for errors other than "held".
    pub async fn try_take(
        store: &kv::Store,
        key: &str,
        instance: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, kv::CreateError> {
        let value = Bytes::copy_from_slice(instance.as_bytes());
        let asked = Instant::now();
        match store.create(key, value.clone()).await {
            Ok(revision) => Ok(Some(Lease::held(store, key, revision, value, ttl, asked))),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes the lease on `key` from its holder when `is_gone` says that holder is gone (its
    /// heartbeat expired), without waiting out the lease: an `update` at the revision read,
    /// which fails if anybody wrote the key meanwhile. `Ok(None)`: free (take it with
    /// [`Lease::try_take`]), held by a live instance, or taken by another meanwhile.
    ///
    /// A holder that is only slow, not gone, learns at its next renewal that it lost the
    /// lease, as when a lease expires under a stalled owner; the changes both read until then
    /// are published under the same ids, and consumers drop what they already applied.
    pub async fn try_take_from_gone(
        store: &kv::Store,
        key: &str,
        instance: &str,
        ttl: Duration,
        is_gone: impl Fn(&str) -> bool,
    ) -> Result<Option<Lease>, String> {
        let Some(entry) = store.entry(key).await.map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let holder = String::from_utf8_lossy(&entry.value);
        if entry.operation != kv::Operation::Put || holder == instance || !is_gone(&holder) {
            return Ok(None);
        }
        let value = Bytes::copy_from_slice(instance.as_bytes());
        let asked = Instant::now();
        match store.update(key, value.clone(), entry.revision).await {
            Ok(revision) => {
                tracing::info!(key, holder = %holder, "relay: took the cursor lease of an instance whose heartbeat expired");
                Ok(Some(Lease::held(store, key, revision, value, ttl, asked)))
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(error) => Err(error.to_string()),
        }
    }

    /// How often to renew: three renewals per lifetime, so one lost round trip is survived.
    pub fn renew_every(ttl: Duration) -> Duration {
        ttl / 3
    }

    /// Renews the lease.
    pub async fn renew(&mut self) -> Renewal {
        let asked = Instant::now();
        match self
            .store
            .update(&self.key, self.value.clone(), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.renewed = asked;
                Renewal::Held
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Renewal::Lost,
            Err(error) => {
                tracing::warn!(key = %self.key, %error, "relay: cannot renew a cursor lease");
                if self.renewed.elapsed() >= self.ttl {
                    Renewal::Lost
                } else {
                    Renewal::Unsure
                }
            }
        }
    }

    /// Gives the lease up (if it is still ours), so that another instance takes the cursor
    /// at its next try rather than when the lease would have expired.
    pub async fn release(self) {
        let deleted = self
            .store
            .delete_expect_revision(&self.key, Some(self.revision));
        if let Ok(Err(error)) = tokio::time::timeout(Duration::from_secs(1), deleted).await {
            tracing::debug!(key = %self.key, %error, "relay: lease not released (expired or taken)");
        }
    }
}

//! The sync worker: claims due and queued sync tasks with the [`SyncScheduler`] (a conditional
//! write per task, so of several instances exactly one runs a task), runs each with the
//! [`SyncEngine`] and the connection's credentials, heartbeats after every page (saving the
//! checkpoints) and finishes the execution with its `sync.task.completed` event in the outbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use im_domain::connection::ConnectionId;
use im_domain::ports::{IntegrationRepository, ProviderRepository};
use im_domain::services::{Claimed, ConnectionService, RunControl, SyncEngine, SyncScheduler, SyncSource};
use im_domain::sync::{ExecutionStatus, SyncExecution};
use im_domain::{Caller, DomainError, Role, UserId};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The user id the worker's provider calls and audit records carry.
pub const WORKER_USER: &str = "sync-scheduler";

/// What the worker needs.
#[derive(Clone)]
pub struct SyncWorker {
    pub scheduler: SyncScheduler,
    pub engine: SyncEngine,
    pub connections: ConnectionService,
    pub integrations: Arc<dyn IntegrationRepository>,
    pub providers: Arc<dyn ProviderRepository>,
    /// Runs at once on this instance.
    pub concurrency: usize,
    /// How often due tasks are looked for.
    pub poll: Duration,
}

/// Runs until `shutdown`; runs in flight then stop at their next page boundary (their
/// checkpoints saved, the execution `cancelled` with the reason) and are waited for by `tasks`.
pub fn spawn_sync_worker(worker: SyncWorker, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let (shutdown, runs) = (shutdown.clone(), tasks.clone());
    tasks.spawn(im_store_embedded::as_worker(async move {
        let permits = Arc::new(Semaphore::new(worker.concurrency.max(1)));
        while !shutdown.is_cancelled() {
            let available = u32::try_from(permits.available_permits()).unwrap_or(1);
            let claimed = if available == 0 { Ok(Vec::new()) } else { worker.scheduler.claim_due(available).await };
            match claimed {
                Ok(claimed) => {
                    for claim in claimed {
                        let Ok(permit) = permits.clone().acquire_owned().await else { return };
                        let (worker, stop) = (worker.clone(), shutdown.clone());
                        runs.spawn(im_store_embedded::as_worker(async move {
                            worker.run(claim, stop).await;
                            drop(permit);
                        }));
                    }
                }
                Err(error) => tracing::warn!(%error, "claiming due sync tasks failed"),
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(worker.poll) => {}
            }
        }
        tracing::debug!("sync worker stopped; runs in flight stop at their next page");
    }));
}

/// The run's hold on its task: every page saves the checkpoints and renews the lease.
struct Lease<'a> {
    scheduler: &'a SyncScheduler,
    claimed: Claimed,
    shutdown: CancellationToken,
    stopping: bool,
}

#[async_trait]
impl RunControl for Lease<'_> {
    async fn page_done(&mut self, execution: &SyncExecution) -> Result<bool, DomainError> {
        self.claimed.execution.value = execution.clone();
        let cancel = self.scheduler.heartbeat(&mut self.claimed).await?;
        self.stopping = self.shutdown.is_cancelled();
        Ok(cancel || self.stopping)
    }
}

impl SyncWorker {
    async fn source(&self, caller: &Caller, claimed: &Claimed) -> Result<SyncSource, DomainError> {
        let task = &claimed.task.value;
        let integration = self.integrations.get(&caller.tenant_id, task.integration_id).await?.value;
        let spec = match &integration.custom_definition {
            Some(_) => None,
            None => Some(self.providers.get(&integration.provider_id).await?.value.spec),
        };
        SyncSource::for_integration(&integration, spec.as_ref(), &task.entity)
    }

    #[tracing::instrument(skip_all, name = "sync.run", fields(tenant = %claimed.task.value.tenant_id, task = %claimed.task.value.id, execution = %claimed.execution.value.id))]
    async fn run(&self, claimed: Claimed, shutdown: CancellationToken) {
        let task = claimed.task.value.clone();
        let user = UserId::new(WORKER_USER).unwrap_or_else(|_| task.created_by.clone());
        let caller = Caller::new(task.tenant_id.clone(), user, vec![Role::Member]);
        let prepared = async {
            let source = self.source(&caller, &claimed).await?;
            let credentials = self.connections.credentials(&caller, task.integration_id, ConnectionId(task.connection_id)).await?;
            Ok::<_, DomainError>((source, credentials))
        }
        .await;
        let mut execution = claimed.execution.value.clone();
        let mut lease = Lease { scheduler: &self.scheduler, claimed, shutdown, stopping: false };
        let (status, error) = match prepared {
            Ok((source, credentials)) => self.engine.run(&task, &source, &credentials, &mut execution, &mut lease).await,
            Err(e) => (ExecutionStatus::Failed, Some(e.to_string())),
        };
        let error = if lease.stopping && status == ExecutionStatus::Cancelled {
            Some("the instance stopped; the next run resumes from the checkpoint".to_owned())
        } else {
            error
        };
        let mut claimed = lease.claimed;
        claimed.execution.value = execution;
        let counts = claimed.execution.value.counts;
        match self.scheduler.finish(claimed, status, error.clone(), &[]).await {
            Ok(released) => {
                crate::metrics::record_sync(status, &counts);
                tracing::info!(
                    status = status.as_str(),
                    error = error.as_deref().unwrap_or(""),
                    task_status = released.value.status.as_str(),
                    "sync run finished"
                );
            }
            // Deleted once the execution had ended, before its release: nothing is left to release.
            Err(DomainError::NotFound { .. }) => {
                tracing::info!(status = status.as_str(), "sync run finished; its task was deleted meanwhile")
            }
            // The lease was lost (this instance stalled past it): the execution is another's now.
            Err(error) => tracing::warn!(%error, "recording the end of a sync run failed"),
        }
    }
}

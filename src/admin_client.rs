//! A client of a replica's admin listener (`meshlb.admin.v1.AdminService`): read and change the
//! fault knobs, flip the reported health. Plaintext, TLS, or mTLS with an admin identity. Used by
//! `meshlb faults` and by the local fleet (`up`, `demo`, `bench`); knows nothing of balancing.

use crate::proto::admin::v1::{
    admin_service_client::AdminServiceClient, GetFaultsRequest, SetServingRequest,
};
use crate::replica::FaultConfig;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::Status;

/// How long connecting to an admin listener may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one replica's admin service listens, and how to reach it.
#[derive(Debug, Clone)]
pub struct AdminAddr {
    /// The admin listener (`admin on ADDR`, the replica's second stdout line).
    pub addr: SocketAddr,
    /// TLS towards it (with the admin identity under mTLS); `None`: plaintext.
    pub tls: Option<ClientTlsConfig>,
}

/// What a replica's admin service says of it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaState {
    /// Its fault knobs.
    pub faults: FaultConfig,
    /// It reports SERVING.
    pub serving: bool,
    /// It is draining (and reports NOT_SERVING).
    pub draining: bool,
}

impl ReplicaState {
    /// `serving`, `not-serving` or `draining`, as `meshlb faults` prints it.
    pub fn health_word(&self) -> &'static str {
        match (self.draining, self.serving) {
            (true, _) => "draining",
            (false, true) => "serving",
            (false, false) => "not-serving",
        }
    }
}

impl AdminAddr {
    /// A plaintext admin listener.
    pub fn plaintext(addr: SocketAddr) -> Self {
        Self { addr, tls: None }
    }

    async fn client(&self) -> Result<AdminServiceClient<Channel>, Status> {
        let addr = self.addr;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::invalid_argument(format!("admin TLS: {e}")))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            Status::unavailable(format!(
                "cannot connect to the admin service at {addr}: {}",
                crate::health::with_causes(e.to_string(), std::error::Error::source(&e))
            ))
        })?;
        Ok(AdminServiceClient::new(channel))
    }

    /// The replica's current fault knobs.
    pub async fn get_faults(&self) -> Result<FaultConfig, Status> {
        Ok(self.state().await?.faults)
    }

    /// The replica's fault knobs and the health it reports.
    pub async fn state(&self) -> Result<ReplicaState, Status> {
        let response = self
            .client()
            .await?
            .get_faults(GetFaultsRequest {})
            .await?
            .into_inner();
        Ok(ReplicaState {
            faults: crate::replica::admin::from_wire(response.faults.unwrap_or_default()),
            serving: response.serving,
            draining: response.draining,
        })
    }

    /// Replaces the replica's fault knobs; returns the previous ones.
    pub async fn set_faults(&self, faults: FaultConfig) -> Result<FaultConfig, Status> {
        let response = self
            .client()
            .await?
            .set_faults(crate::replica::admin::faults_request(faults))
            .await?;
        Ok(crate::replica::admin::from_wire(
            response.into_inner().previous.unwrap_or_default(),
        ))
    }

    /// Makes the replica report SERVING (`true`) or NOT_SERVING over grpc.health.v1.
    pub async fn set_serving(&self, serving: bool) -> Result<(), Status> {
        self.client()
            .await?
            .set_serving(SetServingRequest { serving })
            .await?;
        Ok(())
    }
}

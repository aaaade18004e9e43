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
        let response = self.client().await?.get_faults(GetFaultsRequest {}).await?;
        Ok(crate::replica::admin::from_wire(
            response.into_inner().faults.unwrap_or_default(),
        ))
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

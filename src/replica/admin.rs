//! The admin service (`meshlb.admin.v1.AdminService`: fault knobs and reported health) and who may
//! call it. It is served only on the replica's admin listener, never on the serving port, so a
//! caller of the service cannot reconfigure or drain the replica. Like Envoy's admin port, the
//! listener is on loopback by default; under mTLS it also requires a client certificate whose
//! identity (a DNS or IP subject alternative name) is on an allow list, separate from ordinary
//! callers' certificates.
//!
//! Knows nothing of the UserGuide service it reconfigures beyond its health name.

use super::conn::{Body, Peer};
use super::faults::{FaultConfig, Faults};
use super::metrics::ServingState;
use crate::proto::admin::v1 as admin;
use http::{Request, Response};
use rustls_pki_types::{CertificateDer, ServerName};
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tonic::Status;
use tower::{Service, ServiceExt};

// === impl Admin ===

/// The admin service: reads and changes the fault knobs and the reported health.
#[derive(Clone)]
pub struct Admin {
    faults: Faults,
    health: tonic_health::server::HealthReporter,
    state: Arc<ServingState>,
}

impl Admin {
    /// An admin service over these knobs and this health reporter; `state.draining` turns true
    /// when the replica starts draining, and `state.serving` follows what this service sets.
    pub fn new(
        faults: Faults,
        health: tonic_health::server::HealthReporter,
        state: Arc<ServingState>,
    ) -> Self {
        Self {
            faults,
            health,
            state,
        }
    }
}

fn to_wire(c: FaultConfig) -> admin::Faults {
    admin::Faults {
        latency_us: c.latency.as_micros().try_into().unwrap_or(u64::MAX),
        jitter_us: c.jitter.as_micros().try_into().unwrap_or(u64::MAX),
        fail_rate: c.fail_rate,
    }
}

/// The knobs a wire message asks for.
pub fn from_wire(f: admin::Faults) -> FaultConfig {
    FaultConfig {
        latency: Duration::from_micros(f.latency_us),
        jitter: Duration::from_micros(f.jitter_us),
        fail_rate: f.fail_rate,
    }
}

#[tonic::async_trait]
impl admin::admin_service_server::AdminService for Admin {
    async fn set_faults(
        &self,
        request: tonic::Request<admin::SetFaultsRequest>,
    ) -> Result<tonic::Response<admin::SetFaultsResponse>, Status> {
        let wanted = from_wire(request.into_inner().faults.unwrap_or_default());
        wanted.validate().map_err(Status::invalid_argument)?;
        let previous = self.faults.set(wanted);
        tracing::info!(latency = ?wanted.latency, jitter = ?wanted.jitter, fail_rate = wanted.fail_rate, "fault knobs changed");
        Ok(tonic::Response::new(admin::SetFaultsResponse {
            previous: Some(to_wire(previous)),
        }))
    }

    async fn set_serving(
        &self,
        request: tonic::Request<admin::SetServingRequest>,
    ) -> Result<tonic::Response<admin::SetServingResponse>, Status> {
        // A draining replica says NOT_SERVING so that clients leave; bringing it back would
        // bring calls back to a replica about to stop.
        if self
            .state
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(Status::failed_precondition(
                "the replica is draining; its health stays NOT_SERVING",
            ));
        }
        let serving = request.into_inner().serving;
        self.state
            .serving
            .store(serving, std::sync::atomic::Ordering::Relaxed);
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in ["", crate::proto::USERGUIDE_SERVICE] {
            self.health.set_service_status(service, status).await;
        }
        tracing::info!(?status, "reported health changed by the admin service");
        Ok(tonic::Response::new(admin::SetServingResponse {}))
    }

    async fn get_faults(
        &self,
        _request: tonic::Request<admin::GetFaultsRequest>,
    ) -> Result<tonic::Response<admin::GetFaultsResponse>, Status> {
        let flag = |b: &std::sync::atomic::AtomicBool| b.load(std::sync::atomic::Ordering::Acquire);
        Ok(tonic::Response::new(admin::GetFaultsResponse {
            faults: Some(to_wire(self.faults.get())),
            serving: flag(&self.state.serving),
            draining: flag(&self.state.draining),
        }))
    }
}

/// Builds the wire form of fault knobs, for admin clients.
pub fn faults_request(config: FaultConfig) -> admin::SetFaultsRequest {
    admin::SetFaultsRequest {
        faults: Some(to_wire(config)),
    }
}

// === impl Allow ===

/// Who may call the admin listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Allow {
    /// Anyone who reaches the listener (plaintext or TLS without client certificates: the
    /// listener's address is the protection, loopback by default).
    #[default]
    Reachable,
    /// Only clients whose certificate names one of these (DNS name or IP address subject
    /// alternative names). An empty list lets no one in.
    Certified(Vec<String>),
}

impl Allow {
    /// Whether a peer may call; `Err` says why not, for the PERMISSION_DENIED message.
    pub fn check(&self, peer: &Peer) -> Result<(), String> {
        let Self::Certified(names) = self else {
            return Ok(());
        };
        if names.is_empty() {
            return Err("no admin identity is allowed (set --admin-allow)".into());
        }
        let Some(leaf) = peer.certificates.as_ref().and_then(|c| c.first()) else {
            return Err("the admin service requires a client certificate".into());
        };
        if names.iter().any(|name| certificate_names(leaf, name)) {
            Ok(())
        } else {
            Err("the client certificate is not allowed to call the admin service".into())
        }
    }
}

/// Whether the certificate's subject alternative names include `name` (a DNS name or an IP).
fn certificate_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(name) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

// === impl Gate ===

/// The admin routes for one connection: served when the peer is allowed, PERMISSION_DENIED for
/// every call when it is not.
#[derive(Clone)]
pub(super) struct Gate {
    routes: axum::Router,
    denied: Option<Arc<str>>,
}

impl Gate {
    pub(super) fn new(routes: axum::Router, allow: &Allow, peer: &Peer) -> Self {
        let denied = allow.check(peer).err().map(Arc::from);
        if let Some(reason) = &denied {
            // Debug, not warn: anyone who reaches the port could otherwise fill the log.
            tracing::debug!(%reason, "admin connection refused");
        }
        Self { routes, denied }
    }
}

impl<B> Service<Request<B>> for Gate
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match &self.denied {
            Some(reason) => {
                let status = Status::permission_denied(reason.to_string());
                Box::pin(async move { Ok(status.into_http::<Body>()) })
            }
            None => {
                let routes = self.routes.clone();
                Box::pin(async move { routes.oneshot(req.map(Body::new)).await })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer_with(names: &[&str]) -> Peer {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        Peer {
            certificates: Some(vec![cert.der().clone()]),
        }
    }

    #[test]
    fn reachable_lets_anyone_in() {
        assert!(Allow::Reachable.check(&Peer::default()).is_ok());
    }

    #[test]
    fn certified_needs_a_listed_name() {
        let allow = Allow::Certified(vec!["meshlb-admin".into()]);
        assert!(allow.check(&peer_with(&["meshlb-admin"])).is_ok());
        let err = allow.check(&peer_with(&["meshlb-client"])).unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
        let err = allow.check(&Peer::default()).unwrap_err();
        assert!(err.contains("requires a client certificate"), "{err}");
        let nobody = Allow::Certified(Vec::new());
        assert!(nobody.check(&peer_with(&["meshlb-admin"])).is_err());
    }

    #[test]
    fn ip_identities_match_ip_names() {
        let allow = Allow::Certified(vec!["10.0.0.7".into()]);
        assert!(allow.check(&peer_with(&["10.0.0.7"])).is_ok());
        assert!(allow.check(&peer_with(&["10.0.0.8"])).is_err());
    }
}

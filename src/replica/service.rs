//! The `UserGuideService` and `AdminService` implementations. Both the gRPC handlers and the REST
//! routes go through [`UserGuide`], so the two faces of a replica answer the same way.

use super::data::{LookupError, UserRecord, Users};
use super::faults::{FaultConfig, Faults, Injected};
use crate::proto::admin::v1 as admin;
use crate::proto::userguide::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The replica's logic: the data, the fault knobs, and optionally an upstream tier.
#[derive(Clone)]
pub struct UserGuide {
    users: Arc<Users>,
    faults: Faults,
    upstream: Option<super::Upstream>,
}

impl std::fmt::Debug for UserGuide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserGuide")
            .field("users", &self.users.len())
            .field("upstream", &self.upstream.is_some())
            .finish()
    }
}

impl UserGuide {
    /// A service over `users`, slowed and failed by `faults`.
    pub fn new(users: Users, faults: Faults) -> Self {
        Self {
            users: Arc::new(users),
            faults,
            upstream: None,
        }
    }

    /// Answers GetPoint by asking `upstream` instead of the local data.
    pub fn with_upstream(mut self, upstream: super::Upstream) -> Self {
        self.upstream = Some(upstream);
        self
    }

    /// The points of one user, after the injected faults.
    pub async fn points_of(&self, name: &str, age: i32) -> Result<i64, Status> {
        self.inject().await?;
        // Validate here too, so a bad request never costs an upstream call.
        super::data::validate_profile(name, age).map_err(lookup_status)?;
        match &self.upstream {
            // A fresh status: the upstream's metadata (its x-replica-id) must not leak out as ours.
            Some(upstream) => upstream(name.to_owned(), age)
                .await
                .map_err(|s| Status::new(s.code(), s.message().to_owned())),
            None => self.users.points_of(name, age).map_err(lookup_status),
        }
    }

    /// The users with these points, after the injected faults.
    pub async fn users_with(&self, points: i64) -> Result<Vec<UserRecord>, Status> {
        self.inject().await?;
        Ok(self.users.with_points(points).cloned().collect())
    }

    async fn inject(&self) -> Result<(), Status> {
        match self.faults.apply().await {
            Injected::Pass => Ok(()),
            Injected::Fail => Err(Status::unavailable("injected failure (--fail-rate)")),
        }
    }
}

fn lookup_status(error: LookupError) -> Status {
    match error {
        LookupError::Invalid(m) => Status::invalid_argument(m),
        LookupError::NotFound(m) => Status::not_found(m),
    }
}

fn user_message(u: &UserRecord) -> pb::User {
    pb::User {
        profile: Some(pb::Profile {
            age: u.age,
            name: u.name.clone(),
        }),
        cache: Some(pb::Point { value: u.points }),
    }
}

type UserStream = Pin<Box<dyn Stream<Item = Result<pb::ListUsersResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::user_guide_service_server::UserGuideService for UserGuide {
    async fn get_point(
        &self,
        request: Request<pb::GetPointRequest>,
    ) -> Result<Response<pb::GetPointResponse>, Status> {
        let profile = request
            .into_inner()
            .profile
            .ok_or_else(|| Status::invalid_argument("profile is required"))?;
        let result = self.points_of(&profile.name, profile.age).await;
        tracing::debug!(call = "GetPoint", name = %profile.name, age = profile.age, ok = result.is_ok());
        let value = result?;
        Ok(Response::new(pb::GetPointResponse {
            point: Some(pb::Point { value }),
        }))
    }

    type ListUsersStream = UserStream;

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        let points = request
            .into_inner()
            .point
            .ok_or_else(|| Status::invalid_argument("point is required"))?
            .value;
        let result = self.users_with(points).await;
        tracing::debug!(call = "ListUsers", points, ok = result.is_ok());
        let users = result?;
        let stream = tokio_stream::iter(users.into_iter().map(|u| {
            Ok(pb::ListUsersResponse {
                user: Some(user_message(&u)),
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }
}

// === impl Admin ===

/// The admin service: reads and changes the fault knobs and the reported health.
#[derive(Clone)]
pub struct Admin {
    faults: Faults,
    health: tonic_health::server::HealthReporter,
}

impl Admin {
    /// An admin service over these knobs and this health reporter.
    pub fn new(faults: Faults, health: tonic_health::server::HealthReporter) -> Self {
        Self { faults, health }
    }
}

fn to_wire(c: FaultConfig) -> admin::Faults {
    admin::Faults {
        latency_us: c.latency.as_micros().try_into().unwrap_or(u64::MAX),
        jitter_us: c.jitter.as_micros().try_into().unwrap_or(u64::MAX),
        fail_rate: c.fail_rate,
    }
}

fn from_wire(f: admin::Faults) -> FaultConfig {
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
        request: Request<admin::SetFaultsRequest>,
    ) -> Result<Response<admin::SetFaultsResponse>, Status> {
        let wanted = from_wire(request.into_inner().faults.unwrap_or_default());
        wanted.validate().map_err(Status::invalid_argument)?;
        let previous = self.faults.set(wanted);
        tracing::info!(latency = ?wanted.latency, jitter = ?wanted.jitter, fail_rate = wanted.fail_rate, "fault knobs changed");
        Ok(Response::new(admin::SetFaultsResponse {
            previous: Some(to_wire(previous)),
        }))
    }

    async fn set_serving(
        &self,
        request: Request<admin::SetServingRequest>,
    ) -> Result<Response<admin::SetServingResponse>, Status> {
        let status = if request.into_inner().serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        for service in ["", crate::proto::USERGUIDE_SERVICE] {
            self.health.set_service_status(service, status).await;
        }
        tracing::info!(?status, "reported health changed by the admin service");
        Ok(Response::new(admin::SetServingResponse {}))
    }

    async fn get_faults(
        &self,
        _request: Request<admin::GetFaultsRequest>,
    ) -> Result<Response<admin::GetFaultsResponse>, Status> {
        Ok(Response::new(admin::GetFaultsResponse {
            faults: Some(to_wire(self.faults.get())),
        }))
    }
}

/// Builds the wire form of fault knobs, for admin clients.
pub fn faults_request(config: FaultConfig) -> admin::SetFaultsRequest {
    admin::SetFaultsRequest {
        faults: Some(to_wire(config)),
    }
}

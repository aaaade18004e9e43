//! The `UserGuideService` implementation. Both the gRPC handlers and the REST routes go through
//! [`UserGuide`], so the two faces of a replica answer the same way.

use super::data::{LookupError, UserRecord, Users};
use super::faults::{Faults, Injected};
use crate::proto::userguide::v1 as pb;
use std::pin::Pin;
use std::sync::Arc;
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

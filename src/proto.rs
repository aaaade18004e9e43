//! The generated gRPC code for the `UserGuideService` and the replica's admin service, and the
//! descriptor set that server reflection serves. Nothing here is written by hand.

/// `userguide.v1`: the service every replica serves.
pub mod userguide {
    /// Version 1 of the API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("userguide.v1");
    }
}

/// `meshlb.admin.v1`: run-time fault knobs of a replica.
pub mod admin {
    /// Version 1 of the API.
    #[allow(missing_docs, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("meshlb.admin.v1");
    }
}

/// The encoded `FileDescriptorSet` of every proto in `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("meshlb_descriptor");

/// The fully qualified name of the UserGuide service, as health checks and reflection know it.
pub const USERGUIDE_SERVICE: &str = "userguide.v1.UserGuideService";

/// The gRPC service config of the UserGuide service (`replicas/service-config.json`): `GetPoint`
/// and health checks retried on `UNAVAILABLE`, `ListUsers` hedged, retry throttling, meshlb's
/// p2c. The tools use it unless told otherwise (`--service-config`); the library only when given.
pub const USERGUIDE_SERVICE_CONFIG: &str = include_str!("../replicas/service-config.json");

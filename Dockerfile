# meshlb image: build with the Rust image, run on distroless/cc as a non-root user, with only the
# binary and the user data. `docker build -t meshlb:0.1.0 .`
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
RUN cargo build --release --locked --bin meshlb

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /src/target/release/meshlb /app/meshlb
COPY replicas/users.json /app/replicas/users.json
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/app/meshlb"]
CMD ["replica", "--listen", "0.0.0.0:50051"]

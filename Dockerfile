# Builds the router (with the built-in simulator) and runs it. Without --worker-urls,
# pass --sim-workers N to try it on simulated workers. It listens on 0.0.0.0: pass an admin
# key (-e SWITCHYARD_API_KEY=...) to manage workers at run time; without one the admin API
# refuses changes from the network.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin switchyard --bin switchyard-sim

FROM debian:bookworm-slim
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY --from=build /src/target/release/switchyard-sim /usr/local/bin/switchyard-sim
EXPOSE 30000
USER 65534
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["--host", "0.0.0.0", "--port", "30000", "--sim-workers", "4"]

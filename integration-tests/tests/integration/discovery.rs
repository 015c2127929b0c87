//! grpcurl-style discovery: list services through reflection, check each one's health.

use futures::StreamExt;
use stowage_testkit::{Processes, Setup, channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test]
async fn reflection_lists_every_service_and_health_answers_for_each() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let processes = Processes::all(&setup).await?;
    let addr = processes.processes[0].addr;

    let mut reflection = ServerReflectionClient::new(channel(addr));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        anyhow::bail!("no reflection response");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection answer");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    for expected in [
        "grpc.health.v1.Health",
        "stowage.v1.Files",
        "stowage.v1.Ingest",
        "stowage.v1.Lifecycle",
        "stowage.v1.Media",
        "stowage.v1.Quota",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // The descriptor of a service can be fetched, as grpcurl describe does.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "stowage.v1.Files".into(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let Some(Ok(response)) = responses.next().await else {
        anyhow::bail!("no descriptor response");
    };
    assert!(
        matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(d)) if !d.file_descriptor_proto.is_empty())
    );

    let mut health = HealthClient::new(channel(addr));
    for name in names
        .iter()
        .filter(|n| n.starts_with("stowage.v1."))
        .chain(std::iter::once(&String::new()))
    {
        let status = health
            .check(HealthCheckRequest {
                service: name.clone(),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "{name:?} not serving"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "stowage.v1.Nope".into(),
        })
        .await;
    assert_eq!(unknown.err().map(|s| s.code()), Some(tonic::Code::NotFound));
    Ok(())
}

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    stowage::cli::run(stowage::cli::Cli::parse()).await
}

//! `fake-model --script FILE [--listen ADDR]`: serve a script for manual
//! runs of backshift without a real model.

use clap::Parser;

#[derive(Parser)]
#[command(about = "A scripted OpenAI-compatible model server for tests")]
struct Args {
    /// The script (JSON).
    #[arg(long)]
    script: std::path::PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.script)?;
    let script: fake_model::Script = serde_json::from_str(&text)?;
    let server = fake_model::FakeModel::start_on(args.listen, script).await?;
    println!(
        "fake model serving {} at {}",
        args.script.display(),
        server.base_url()
    );
    tokio::signal::ctrl_c().await?;
    let failures = server.failures();
    if !failures.is_empty() {
        eprintln!("script checks failed:\n{}", failures.join("\n"));
        std::process::exit(1);
    }
    Ok(())
}

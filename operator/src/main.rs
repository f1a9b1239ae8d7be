//! The `serf-operator` command: `crds` writes the CRDs; more subcommands follow.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "serf-operator",
    version,
    about = "Routes HashiCorp Serf events to Kubernetes Jobs and query answers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write the CustomResourceDefinitions as YAML files into a directory, or print them.
    Crds {
        /// The directory to write (one file per CRD); `-` prints them to stdout.
        #[arg(long, default_value = serf_operator_crds::CHART_CRD_DIR)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds { out } => {
            let files = serf_operator_crds::crd_files()?;
            if out.as_os_str() == "-" {
                for (_, yaml) in files {
                    print!("---\n{yaml}");
                }
                return Ok(());
            }
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for (name, yaml) in files {
                let path = out.join(name);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
    }
}

fn main() -> anyhow::Result<()> {
    anyhow::bail!("scap-bridge is not implemented yet; see ARCHITECTURE.md")
}

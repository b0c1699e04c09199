fn main() -> anyhow::Result<()> {
    anyhow::bail!("mwdist is not implemented yet; see ARCHITECTURE.md")
}

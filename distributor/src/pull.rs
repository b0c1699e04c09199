//! `mwdist pull`: preheat an image's blobs into an agent before a rollout, by pulling
//! them through its mirror (an index's every manifest, each manifest's config and layers).

use std::time::Duration;

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Split `name:tag` / `name@digest`.
pub fn split_image(image: &str) -> anyhow::Result<(String, String)> {
    if let Some((n, d)) = image.split_once('@') {
        return Ok((n.to_string(), d.to_string()));
    }
    match image.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => Ok((n.to_string(), t.to_string())),
        _ => Ok((image.to_string(), "latest".to_string())),
    }
}

pub async fn preheat(agent: &str, image: &str) -> anyhow::Result<()> {
    let (name, reference) = split_image(image)?;
    let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build()?;
    let mut manifests = vec![reference];
    let mut blobs = Vec::new();
    while let Some(r) = manifests.pop() {
        let url = format!("http://{agent}/v2/{name}/manifests/{r}");
        let resp = http.get(&url).header("accept", ACCEPT).send().await?.error_for_status()?;
        let v: serde_json::Value = resp.json().await?;
        for m in v["manifests"].as_array().into_iter().flatten() {
            if let Some(d) = m["digest"].as_str() {
                manifests.push(d.to_string());
            }
        }
        for b in v["layers"].as_array().into_iter().flatten().chain(std::iter::once(&v["config"])) {
            if let Some(d) = b["digest"].as_str() {
                blobs.push(d.to_string());
            }
        }
    }
    blobs.sort();
    blobs.dedup();
    let tasks: Vec<_> = blobs
        .iter()
        .map(|d| {
            let (http, url) = (http.clone(), format!("http://{agent}/v2/{name}/blobs/{d}"));
            tokio::spawn(async move {
                let mut resp = http.get(&url).send().await?.error_for_status()?;
                let mut n = 0u64;
                while let Some(c) = resp.chunk().await? {
                    n += c.len() as u64;
                }
                Ok::<u64, reqwest::Error>(n)
            })
        })
        .collect();
    for (d, t) in blobs.iter().zip(tasks) {
        let n = t.await??;
        println!("{d} {n} bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        assert_eq!(split_image("a/b:v1").expect("ok"), ("a/b".into(), "v1".into()));
        assert_eq!(split_image("a/b").expect("ok"), ("a/b".into(), "latest".into()));
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(split_image(&format!("a@{d}")).expect("ok"), ("a".into(), d));
    }
}

//! What a worker says about itself: the models it serves and how many data-parallel ranks it
//! runs. Answers are bounded (a hostile worker cannot make the router keep a million model ids).

use axum::http::Method;
use serde_json::Value;

use crate::proxy::Upstream;

/// At most this many model ids are kept per worker.
const MAX_MODELS: usize = 64;
/// Longer ids are ignored (no real model id comes close).
const MAX_MODEL_ID: usize = 512;
/// Information answers are not read beyond this.
const MAX_ANSWER: usize = 1 << 20;
/// At most this many ranks per engine.
pub const MAX_DP_SIZE: u32 = 256;

/// The models a worker serves: every id of `/v1/models`, else `/get_model_info`'s
/// `model_path`; empty when it answers neither (yet).
pub async fn models(upstream: &Upstream, url: &str) -> Vec<String> {
    if let Ok((200, body)) = upstream.fetch_bounded(Method::GET, url, "/v1/models", MAX_ANSWER).await {
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            let ids = model_ids(&v);
            if !ids.is_empty() {
                return ids;
            }
        }
    }
    if let Ok((200, body)) = upstream.fetch_bounded(Method::GET, url, "/get_model_info", MAX_ANSWER).await {
        if let Some(id) = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("model_path").and_then(Value::as_str).map(str::to_owned))
            .filter(|id| valid_id(id))
        {
            return vec![id];
        }
    }
    Vec::new()
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_MODEL_ID
}

/// The ids of an OpenAI `/v1/models` list, deduplicated, in order, bounded.
fn model_ids(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    for id in list.get("data").and_then(Value::as_array).into_iter().flatten().filter_map(|m| m.get("id")?.as_str()) {
        if valid_id(id) && !ids.iter().any(|x| x == id) {
            ids.push(id.to_owned());
            if ids.len() == MAX_MODELS {
                break;
            }
        }
    }
    ids
}

/// How many data-parallel ranks the engine runs, from `/get_server_info`, and whether it
/// reads the chosen rank from the body (SGLang's `dp_size`) or only from the header (an
/// engine reporting `data_parallel_size`). `None` when it does not say.
pub async fn dp_size(upstream: &Upstream, url: &str) -> Option<(u32, bool)> {
    let (status, body) = upstream.fetch_bounded(Method::GET, url, "/get_server_info", MAX_ANSWER).await.ok()?;
    if status != 200 {
        return None;
    }
    dp_size_of(&serde_json::from_slice(&body).ok()?)
}

fn dp_size_of(info: &Value) -> Option<(u32, bool)> {
    let size = |key: &str| info.get(key).and_then(Value::as_u64).map(|n| n.clamp(1, u64::from(MAX_DP_SIZE)) as u32);
    size("dp_size").map(|n| (n, true)).or_else(|| size("data_parallel_size").map(|n| (n, false)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_listed_model_once_and_bounded() {
        let list = json!({"data": [{"id": "a"}, {"id": "b"}, {"id": "a"}, {"id": ""}, {"x": 1}, {"id": 7}]});
        assert_eq!(model_ids(&list), ["a", "b"]);
        let many: Vec<Value> = (0..1000).map(|i| json!({"id": format!("m{i}")})).collect();
        assert_eq!(model_ids(&json!({"data": many})).len(), MAX_MODELS);
        assert!(model_ids(&json!({"data": [{"id": "x".repeat(10_000)}]})).is_empty());
        assert!(model_ids(&json!([1, 2])).is_empty());
    }

    #[test]
    fn dp_size_and_where_the_rank_goes() {
        assert_eq!(dp_size_of(&json!({"dp_size": 4})), Some((4, true)));
        assert_eq!(dp_size_of(&json!({"data_parallel_size": 2})), Some((2, false)));
        assert_eq!(dp_size_of(&json!({"dp_size": 0})), Some((1, true)));
        assert_eq!(dp_size_of(&json!({"dp_size": 1_000_000})), Some((MAX_DP_SIZE, true)));
        assert_eq!(dp_size_of(&json!({"dp_size": "4"})), None);
    }
}

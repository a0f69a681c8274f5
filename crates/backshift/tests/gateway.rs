//! The model gateway: an agent in the sandbox (played by the command
//! agent with curl) reaches the scripted model only through it, with its
//! own token; the provider key the server holds never enters the sandbox
//! or the record; calls are counted and the token budget is enforced.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{PROVIDER_KEY, World, script};
use serde_json::{Value, json};

/// Two calls (plain and streamed), one with a wrong token, then a search
/// for the provider key in the environment, every process's arguments
/// and environment, and every file. The needle is assembled at run time
/// so that it appears in no command line.
const AGENT: &str = r#"set -e
call() { curl -sS "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' -d "$1"; }
call '{"model":"any","messages":[{"role":"user","content":"hi"}]}' > plain.json
call '{"model":"any","stream":true,"messages":[{"role":"user","content":"hi"}]}' > streamed.txt
echo "wrong token: $(curl -s -o /dev/null -w '%{http_code}' "$OPENAI_BASE_URL/chat/completions" -H 'Authorization: Bearer bsm_wrong' -d '{}')"
echo "models: $(curl -s "$OPENAI_BASE_URL/models" -H "Authorization: Bearer $OPENAI_API_KEY")"
needle="$(printf '%s%s' 'sk-provider-' 'SECRET-4242')"
leaks=""
env | grep -qF "$needle" && leaks="$leaks env"
for p in /proc/[0-9]*; do tr '\0' '\n' < "$p/cmdline"; echo; tr '\0' '\n' < "$p/environ"; echo; done > /tmp/procs.txt 2>/dev/null || true
grep -qF "$needle" /tmp/procs.txt && leaks="$leaks processes"
files=$(grep -rlIF "$needle" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null || true)
[ -n "$files" ] && leaks="$leaks files:$files"
echo "leaks:[$leaks]"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_in_the_sandbox_reach_the_model_only_through_the_gateway() {
    let s = script(json!({"steps": [
        {"reply": {"content": "plain answer"}},
        {"reply": {"content": "streamed answer"}}
    ]}));
    let priced = format!(
        "[model]\nbase_url = \"{{fake_url}}\"\nmodel = \"scripted\"\napi_key_env = \"{}\"\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = 15.0\n",
        common::PROVIDER_KEY_ENV
    );
    let w = World::start(Some(s), &priced).await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&["run", "Call the model", "--repo", &repo, "--command", AGENT])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    let attempt = format!("{task}-1");
    let evs = w.events(&attempt).await;
    let output: String = common::command_output(&evs);
    assert_eq!(view["state"], "succeeded", "{view}\n{output}");
    assert!(output.contains("wrong token: 401"), "{output}");
    assert!(output.contains("\"id\":\"scripted\""), "{output}");
    assert!(output.contains("leaks:[]"), "{output}");

    // Upstream, the gateway spoke with the real key, and asked for usage
    // on the streamed call.
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    let bearer = format!("Bearer {PROVIDER_KEY}");
    assert_eq!(
        fake.authorizations(),
        [Some(bearer.clone()), Some(bearer)],
        "the wrong-token call never went upstream"
    );
    let requests = fake.requests();
    assert_eq!(requests[0]["model"], "scripted");
    assert_eq!(requests[1]["stream_options"]["include_usage"], true);

    // Each call is on the record, counted, without secrets.
    let calls: Vec<&Value> = evs.iter().filter(|e| e["type"] == "model_call").collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["stream"], false);
    assert_eq!(calls[1]["stream"], true);
    let (mut input, mut output, mut cost) = (0, 0, 0.0);
    for c in &calls {
        assert_eq!(c["status"], 200, "{c}");
        let (i, o) = (
            c["usage"]["input_tokens"].as_u64().unwrap(),
            c["usage"]["output_tokens"].as_u64().unwrap(),
        );
        assert!(i > 0 && o > 0, "{c}");
        let expected = (i as f64 * 3.0 + o as f64 * 15.0) / 1e6;
        let got = c["cost_usd"].as_f64().unwrap();
        assert!((got - expected).abs() < 1e-12, "{c}");
        (input, output, cost) = (input + i, output + o, cost + got);
    }
    // The attempt adds them up.
    let usage = &view["attempts"][0]["usage"];
    assert_eq!(usage["calls"], 2, "{usage}");
    assert_eq!(usage["input_tokens"], input, "{usage}");
    assert_eq!(usage["output_tokens"], output, "{usage}");
    assert!(
        (usage["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{usage}"
    );
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(
        shown.contains(&format!(
            "model    2 call(s), {input} in / {output} out tokens, $"
        )),
        "{shown}"
    );
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(PROVIDER_KEY), "the key is in an event");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("plain answer"), "{diff}");
    assert!(diff.contains("streamed"), "{diff}");
    assert!(!diff.contains(PROVIDER_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_token_budget_is_refused_and_ends_the_attempt() {
    let s = script(json!({"steps": [{"reply": {"content": "one answer"}}]}));
    let w = World::start(Some(s), "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let agent = r#"call() { curl -s -o /dev/null -w '%{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -d '{"messages":[{"role":"user","content":"hi"}]}'; }
echo "first: $(call)"; echo "second: $(call)"; sleep 30"#;
    let (code, out, err) = w
        .cli(&[
            "run",
            "Spend",
            "--repo",
            &repo,
            "--max-tokens",
            "5",
            "--command",
            agent,
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    let a = &view["attempts"][0];
    assert_eq!(a["state"], "failed", "{view}");
    assert_eq!(a["reason"], "budget_exhausted", "{view}");
    let evs = w.events(&format!("{task}-1")).await;
    let output: String = common::command_output(&evs);
    // Journaled before the refusal stopped the attempt, recorded by the
    // catch-up from the shim's journal before the sandbox went.
    assert!(output.contains("first: 200"), "{output}");
    let refused = evs
        .iter()
        .find(|e| e["type"] == "model_call" && e["status"] == 429)
        .unwrap();
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("limits.max_tokens"),
        "{refused}"
    );
}

/// The responses, Anthropic messages and Gemini APIs, plain and
/// streamed, with the sandbox's token (as a bearer token, `x-api-key`,
/// `x-goog-api-key`).
const OTHER_APIS: &str = r#"set -e
post() { curl -sS "$1" -H "$2" -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' -d "$3"; echo; }
post "$OPENAI_BASE_URL/responses" "Authorization: Bearer $OPENAI_API_KEY" '{"model":"any","input":"hi"}'
post "$OPENAI_BASE_URL/responses" "Authorization: Bearer $OPENAI_API_KEY" '{"model":"any","stream":true,"input":"hi"}'
post "$ANTHROPIC_BASE_URL/v1/messages" "x-api-key: $ANTHROPIC_API_KEY" '{"model":"any","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}'
post "$ANTHROPIC_BASE_URL/v1/messages" "x-api-key: $ANTHROPIC_API_KEY" '{"model":"any","max_tokens":50,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
echo "wrong key: $(curl -s -o /dev/null -w '%{http_code}' "$ANTHROPIC_BASE_URL/v1/messages" -H 'x-api-key: bsm_wrong' -d '{}')"
post "$GOOGLE_GEMINI_BASE_URL/v1beta/models/any:generateContent" "x-goog-api-key: $GEMINI_API_KEY" '{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'
post "$GOOGLE_GEMINI_BASE_URL/v1beta/models/any:streamGenerateContent?alt=sse" "x-goog-api-key: $GEMINI_API_KEY" '{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}'
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_speaks_responses_anthropic_messages_and_gemini_too() {
    let s = script(json!({"steps": [
        {"reply": {"content": "plain response"}},
        {"reply": {"content": "streamed response"}},
        {"reply": {"content": "plain message"}},
        {"reply": {"content": "streamed message"}},
        {"reply": {"content": "plain gemini"}},
        {"reply": {"content": "streamed gemini"}}
    ]}));
    let config = format!(
        "[model]\nbase_url = \"{{fake_url}}\"\nmodel = \"scripted\"\napi_key_env = \"{env}\"\nanthropic_base_url = \"{{fake_url}}\"\nanthropic_model = \"scripted-claude\"\nanthropic_api_key_env = \"{env}\"\ngemini_base_url = \"{{fake_root}}\"\ngemini_model = \"scripted-gemini\"\ngemini_api_key_env = \"{env}\"\n",
        env = common::PROVIDER_KEY_ENV
    );
    let w = World::start(Some(s), &config).await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "run",
            "Call the model",
            "--repo",
            &repo,
            "--command",
            OTHER_APIS,
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    let evs = w.events(&format!("{task}-1")).await;
    let output = common::command_output(&evs);
    assert_eq!(view["state"], "succeeded", "{view}\n{output}");
    assert!(output.contains("wrong key: 401"), "{output}");
    assert!(output.contains("\"text\":\"plain response\""), "{output}");
    assert!(output.contains("event: response.completed"), "{output}");
    assert!(output.contains("\"text\":\"plain message\""), "{output}");
    assert!(output.contains("event: message_stop"), "{output}");
    assert!(output.contains("\"text\":\"plain gemini\""), "{output}");
    assert!(output.contains("\"finishReason\":\"STOP\""), "{output}");

    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    let bearer = format!("Bearer {PROVIDER_KEY}");
    let x_api_key = format!("x-api-key {PROVIDER_KEY}");
    let x_goog = format!("x-goog-api-key {PROVIDER_KEY}");
    assert_eq!(
        fake.authorizations(),
        [
            Some(bearer.clone()),
            Some(bearer),
            Some(x_api_key.clone()),
            Some(x_api_key),
            Some(x_goog.clone()),
            Some(x_goog)
        ]
    );
    let requests = fake.requests();
    assert_eq!(requests[0]["model"], "scripted");
    assert_eq!(requests[2]["model"], "scripted-claude");

    let calls: Vec<&Value> = evs.iter().filter(|e| e["type"] == "model_call").collect();
    let apis: Vec<(&str, bool)> = calls
        .iter()
        .map(|c| (c["api"].as_str().unwrap(), c["stream"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        apis,
        [
            ("responses", false),
            ("responses", true),
            ("messages", false),
            ("messages", true),
            ("gemini.generate_content", false),
            ("gemini.generate_content", true)
        ]
    );
    for c in &calls {
        assert_eq!(c["status"], 200, "{c}");
        assert!(c["usage"]["input_tokens"].as_u64().unwrap() > 0, "{c}");
        assert!(c["usage"]["output_tokens"].as_u64().unwrap() > 0, "{c}");
    }
    assert_eq!(calls[2]["model"], "scripted-claude");
    assert_eq!(calls[4]["model"], "scripted-gemini");
}

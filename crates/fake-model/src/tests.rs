use super::*;

fn script(v: Value) -> Script {
    serde_json::from_value(v).unwrap()
}

async fn post(url: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{url}/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn user(text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": text}],
           "tools": [{"type": "function", "function": {"name": "run_command"}}]})
}

#[tokio::test]
async fn replays_tool_calls_and_requires_their_results() {
    let fake = FakeModel::start(script(json!({"steps": [
        {"expect": {"user_contains": "hello", "tools_include": ["run_command"]},
         "reply": {"content": "ok", "tool_calls": [{"name": "run_command", "arguments": {"command": "ls"}}]}},
        {"expect": {"tool_results": [{"contains": "README"}]}, "reply": {"content": "done"}}
    ]})))
    .await
    .unwrap();
    let (code, body) = post(&fake.base_url(), user("hello")).await;
    assert_eq!(code, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "run_command");
    assert_eq!(call["function"]["arguments"], r#"{"command":"ls"}"#);
    // A follow-up that forgets the tool result is refused and recorded.
    let mut forgot = user("hello");
    forgot["messages"]
        .as_array_mut()
        .unwrap()
        .push(v["choices"][0]["message"].clone());
    let (code, body) = post(&fake.base_url(), forgot).await;
    assert_eq!(code, 400, "{body}");
    let failures = fake.failures();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].contains("got no tool message"), "{failures:?}");
    assert!(
        failures[0].contains("should contain \"README\""),
        "{failures:?}"
    );
}

#[tokio::test]
async fn a_new_conversation_owes_nothing_to_the_previous_one() {
    // Two tasks in turn: the second starts afresh after the first's call.
    let fake = FakeModel::start(script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "ls"}}]}},
        {"expect": {"user_contains": "second"}, "reply": {"content": "fine"}}
    ]})))
    .await
    .unwrap();
    assert_eq!(post(&fake.base_url(), user("first")).await.0, 200);
    let (code, body) = post(&fake.base_url(), user("second")).await;
    assert_eq!(code, 200, "{body}");
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
}

#[tokio::test]
async fn a_well_behaved_client_passes_every_check() {
    let fake = FakeModel::start(script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}},
        {"expect": {"tool_results": [{"contains": "A"}, {"contains": "B"}]}, "reply": {"content": "fine"}}
    ]})))
    .await
    .unwrap();
    let (_, body) = post(&fake.base_url(), user("x")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let msg = v["choices"][0]["message"].clone();
    let ids: Vec<String> = msg["tool_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    let follow = json!({"model": "m", "messages": [
        {"role": "user", "content": "x"}, msg,
        {"role": "tool", "tool_call_id": ids[0], "content": "A out"},
        {"role": "tool", "tool_call_id": ids[1], "content": "B out"}]});
    let (code, body) = post(&fake.base_url(), follow).await;
    assert_eq!(code, 200, "{body}");
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(fake.remaining(), 0);
    assert_eq!(fake.requests().len(), 2);
}

#[tokio::test]
async fn scripted_errors_and_exhaustion() {
    let fake = FakeModel::start(script(
        json!({"steps": [{"reply": {"status": 503, "error": "overloaded"}}]}),
    ))
    .await
    .unwrap();
    let (code, body) = post(&fake.base_url(), user("x")).await;
    assert_eq!((code, body.contains("overloaded")), (503, true));
    let (code, _) = post(&fake.base_url(), user("x")).await;
    assert_eq!(code, 400);
    assert!(fake.failures()[0].contains("but the script has"));
}

#[tokio::test]
async fn streams_in_openai_chunk_format() {
    let fake = FakeModel::start(script(json!({"steps": [
        {"reply": {"content": "Hello there, world", "tool_calls": [{"name": "write_file", "arguments": {"path": "a.txt", "content": "x"}}]}}
    ]})))
    .await
    .unwrap();
    let mut req = user("x");
    req["stream"] = json!(true);
    let (code, body) = post(&fake.base_url(), req).await;
    assert_eq!(code, 200);
    // Reassemble as a client would.
    let (mut text, mut args, mut finish, mut saw_done, mut usage) =
        (String::new(), String::new(), None, false, None);
    for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            saw_done = true;
            continue;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        let Some(choice) = v["choices"].get(0) else {
            continue;
        };
        if let Some(c) = choice["delta"]["content"].as_str() {
            text.push_str(c);
        }
        if let Some(a) = choice["delta"]["tool_calls"][0]["function"]["arguments"].as_str() {
            args.push_str(a);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(text, "Hello there, world");
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap()["path"],
        "a.txt"
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert!(saw_done);
    assert!(usage.unwrap()["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn turn_mode_answers_a_conversation_state_the_same_way_every_time() {
    let fake = FakeModel::start(script(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "ls"}}]}},
        {"expect": {"tool_results": [{"contains": "README"}]},
         "reply": {"content": "done"}}
    ]})))
    .await
    .unwrap();
    // The same opening twice (an agent resumed from a checkpoint) gets the
    // same call with the same id.
    let (_, a) = post(&fake.base_url(), user("hello")).await;
    let (_, b) = post(&fake.base_url(), user("hello")).await;
    let a: Value = serde_json::from_str(&a).unwrap();
    let b: Value = serde_json::from_str(&b).unwrap();
    let call = a["choices"][0]["message"]["tool_calls"][0].clone();
    assert_eq!(call, b["choices"][0]["message"]["tool_calls"][0]);
    assert_eq!(call["id"], "call_1_1");

    // Step 2 is chosen by the one assistant message; its call must be
    // answered.
    let mut req = user("hello");
    let messages = req["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": "", "tool_calls": [call]}));
    let (code, body) = post(&fake.base_url(), req.clone()).await;
    assert_eq!(code, 400, "the unanswered call is refused: {body}");
    req["messages"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "tool", "tool_call_id": "call_1_1", "content": "README.md"}));
    let (code, body) = post(&fake.base_url(), req).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("done"));
    assert_eq!(fake.remaining(), 0);
    assert_eq!(fake.failures().len(), 1, "{:?}", fake.failures());
}

#[tokio::test]
async fn requests_without_tools_get_the_untooled_reply_and_take_no_step() {
    let fake = FakeModel::start(script(json!({
        "untooled": {"content": "A title"},
        "steps": [{"reply": {"content": "the real answer"}}]
    })))
    .await
    .unwrap();
    let title = json!({"model": "m", "messages": [{"role": "user", "content": "name this"}]});
    for _ in 0..2 {
        let (code, body) = post(&fake.base_url(), title.clone()).await;
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "A title");
    }
    assert_eq!(fake.remaining(), 1, "side requests consume no step");
    let (_, body) = post(&fake.base_url(), user("work")).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "the real answer");
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
}

async fn post_to(url: &str, path: &str, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{url}/{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `data:` payloads of a server-sent-event stream, with their event names.
fn events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for line in body.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

fn tool_script() -> Script {
    script(json!({"steps": [
        {"expect": {"user_contains": "list", "tools_include": ["shell"]},
         "reply": {"content": "Listing.", "tool_calls": [{"name": "shell", "arguments": {"command": "ls"}}]}},
        {"expect": {"tool_results": [{"contains": "README"}]}, "reply": {"content": "There is a README."}}
    ]}))
}

#[tokio::test]
async fn speaks_the_responses_api_streamed_and_not() {
    for stream in [false, true] {
        let fake = FakeModel::start(tool_script()).await.unwrap();
        let first = json!({"model": "m", "stream": stream, "instructions": "be brief",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]}],
            "tools": [{"type": "function", "name": "shell", "parameters": {}}]});
        let (code, body) = post_to(&fake.base_url(), "responses", first).await;
        assert_eq!(code, 200, "{body}");
        let output = if stream {
            let evs = events(&body);
            assert_eq!(evs[0].0, "response.created");
            let deltas: String = evs
                .iter()
                .filter(|(n, _)| n == "response.output_text.delta")
                .map(|(_, d)| d["delta"].as_str().unwrap())
                .collect();
            assert_eq!(deltas, "Listing.");
            let (last, done) = evs.last().unwrap();
            assert_eq!(last, "response.completed");
            assert_eq!(
                done["response"]["usage"]["output_tokens"],
                done["response"]["usage"]["output_tokens"].as_u64().unwrap()
            );
            let seqs: Vec<u64> = evs
                .iter()
                .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
                .collect();
            assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
            done["response"]["output"].clone()
        } else {
            serde_json::from_str::<Value>(&body).unwrap()["output"].clone()
        };
        let call = output
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "function_call")
            .unwrap()
            .clone();
        assert_eq!(call["name"], "shell");
        assert_eq!(call["arguments"], r#"{"command":"ls"}"#);
        let second = json!({"model": "m", "stream": stream,
            "input": [{"type": "message", "role": "user", "content": "list files"},
                      call.clone(),
                      {"type": "function_call_output", "call_id": call["call_id"], "output": "README.md"}],
            "tools": [{"type": "function", "name": "shell"}]});
        let (code, body) = post_to(&fake.base_url(), "responses", second).await;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("There is a README."), "{body}");
        assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    }
}

#[tokio::test]
async fn speaks_the_anthropic_messages_api_streamed_and_not() {
    for stream in [false, true] {
        let fake = FakeModel::start(tool_script()).await.unwrap();
        let first = json!({"model": "m", "stream": stream, "max_tokens": 100, "system": "be brief",
            "messages": [{"role": "user", "content": "list files"}],
            "tools": [{"name": "shell", "input_schema": {"type": "object"}}]});
        let (code, body) = post_to(&fake.base_url(), "messages", first).await;
        assert_eq!(code, 200, "{body}");
        let (text, tool) = if stream {
            let evs = events(&body);
            assert_eq!(evs[0].0, "message_start");
            assert_eq!(evs.last().unwrap().0, "message_stop");
            let text: String = evs
                .iter()
                .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
                .collect();
            let json_text: String = evs
                .iter()
                .filter_map(|(_, d)| d.pointer("/delta/partial_json").and_then(Value::as_str))
                .collect();
            let start = evs
                .iter()
                .find(|(_, d)| d.pointer("/content_block/type") == Some(&json!("tool_use")))
                .unwrap();
            let delta = evs.iter().find(|(n, _)| n == "message_delta").unwrap();
            assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
            let mut block = start.1["content_block"].clone();
            block["input"] = serde_json::from_str(&json_text).unwrap();
            (text, block)
        } else {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["stop_reason"], "tool_use");
            (
                v["content"][0]["text"].as_str().unwrap().to_owned(),
                v["content"][1].clone(),
            )
        };
        assert_eq!(text, "Listing.");
        assert_eq!(tool["input"], json!({"command": "ls"}));
        let second = json!({"model": "m", "stream": stream, "max_tokens": 100,
            "messages": [{"role": "user", "content": "list files"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Listing."}, tool.clone()]},
                         {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool["id"],
                                                       "content": [{"type": "text", "text": "README.md"}]}]}],
            "tools": [{"name": "shell", "input_schema": {"type": "object"}}]});
        let (code, body) = post_to(&fake.base_url(), "messages", second).await;
        assert_eq!(code, 200, "{body}");
        let said: String = if stream {
            events(&body)
                .iter()
                .filter_map(|(_, d)| d.pointer("/delta/text").and_then(Value::as_str))
                .collect()
        } else {
            serde_json::from_str::<Value>(&body).unwrap()["content"][0]["text"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        assert_eq!(said, "There is a README.");
        assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    }
}

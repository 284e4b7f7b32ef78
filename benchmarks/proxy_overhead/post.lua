-- wrk request script: the small non-streaming chat request every run sends, to nginx directly
-- and through the gateway alike (nginx ignores the body; the gateway validates and forwards it).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"chat","messages":[{"role":"user","content":"Name three colors."}],"max_tokens":24,"temperature":0}'

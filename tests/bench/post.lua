-- wrk script: POST a new integration per request.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_TOKEN")
wrk.body = '{"providerId":"github","name":"bench","description":"created by make bench","config":{"organization":"acme","repositories":["acme/api","acme/web"]}}'

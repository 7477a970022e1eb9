# Quick start: `make run` brings up a local cluster and serves on
# 127.0.0.1:7070; `make test` runs every check CI runs.
GO ?= go
# Runs per target: a count, not a duration (a duration can end mid-minimisation
# and fail the run with "context deadline exceeded").
FUZZTIME ?= 50000x

.PHONY: run test build proto bench load fuzz

run:
	$(GO) run ./cmd/shardgate dev

test:
	$(GO) vet ./...
	$(GO) test -race -count=1 ./...

build:
	$(GO) build -o bin/ ./cmd/...

# Regenerates proto/shardgate/v1/*.pb.go with the tools pinned in proto/tools.mod.
proto:
	cd proto && $(GO) tool -modfile=tools.mod buf lint
	cd proto && $(GO) tool -modfile=tools.mod buf generate

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./router ./shards ./server ./cache ./events

# Load test against a running server (`make run` in another terminal): every
# scenario in turn on the same data, throughput shown relative to noop. With
# LOAD_PG (a shard's DSN) the PostgreSQL baselines pg-insert and pg-get run
# too, and put-item and get-user are shown relative to them.
LOAD_ADDR ?= 127.0.0.1:7070
LOAD_DURATION ?= 10s
LOAD_PG ?=
comma := ,
LOAD_SCENARIOS = noop,get-session,get-session-nocache,get-config,get-user,put-item,put-user,create-session,mixed$(if $(LOAD_PG),$(comma)pg-insert$(comma)pg-get)
load:
	$(GO) run ./cmd/shardbench -addr $(LOAD_ADDR) -c 32 -duration $(LOAD_DURATION) \
		-scenario $(LOAD_SCENARIOS) $(if $(LOAD_PG),-pg '$(LOAD_PG)')

# Runs each fuzz target for FUZZTIME; the seeds in testdata/fuzz also run in `make test`.
fuzz:
	$(GO) test ./server -run '^$$' -fuzz '^FuzzValidateJSON$$' -fuzztime $(FUZZTIME)
	$(GO) test ./server -run '^$$' -fuzz '^FuzzParseToken$$' -fuzztime $(FUZZTIME)
	$(GO) test ./server -run '^$$' -fuzz '^FuzzValidateIdentifiers$$' -fuzztime $(FUZZTIME)
	$(GO) test ./server -run '^$$' -fuzz '^FuzzPageToken$$' -fuzztime $(FUZZTIME)
	$(GO) test ./cache -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME)
	$(GO) test ./events -run '^$$' -fuzz '^FuzzParseCursor$$' -fuzztime $(FUZZTIME)
	$(GO) test ./events -run '^$$' -fuzz '^FuzzDecodeEntry$$' -fuzztime $(FUZZTIME)
	$(GO) test ./events -run '^$$' -fuzz '^FuzzParseWake$$' -fuzztime $(FUZZTIME)
	$(GO) test ./auth -run '^$$' -fuzz '^FuzzParseBearer$$' -fuzztime $(FUZZTIME)
	$(GO) test ./auth -run '^$$' -fuzz '^FuzzPrincipalFromClaims$$' -fuzztime $(FUZZTIME)
	$(GO) test ./auth -run '^$$' -fuzz '^FuzzVerifyToken$$' -fuzztime $(FUZZTIME)
	$(GO) test ./server -run '^$$' -fuzz '^FuzzConfigSchema$$' -fuzztime $(FUZZTIME)
	$(GO) test ./ratelimit -run '^$$' -fuzz '^FuzzParseRates$$' -fuzztime $(FUZZTIME)
	$(GO) test ./auth/keyset -run '^$$' -fuzz '^FuzzParseKeys$$' -fuzztime $(FUZZTIME)
	$(GO) test ./shards -run '^$$' -fuzz '^FuzzConninfo$$' -fuzztime $(FUZZTIME)
	$(GO) test ./shards -run '^$$' -fuzz '^FuzzParseMoveObjectName$$' -fuzztime $(FUZZTIME)
	$(GO) test ./router -run '^$$' -fuzz '^FuzzPlace$$' -fuzztime $(FUZZTIME)
	$(GO) test ./importer -run '^$$' -fuzz '^FuzzParseMapping$$' -fuzztime $(FUZZTIME)

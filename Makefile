# bs3 — see README.md.
GO      ?= go
PREFIX  ?= /usr/local
SYSTEMD ?= /etc/systemd/system

.PHONY: all bs3 deps test vet run bench crashpoints install clean

all: bs3

bs3:
	$(GO) build -o bs3 .

# Everything the tests need that is not Go code (Debian packages, MinIO).
deps:
	./scripts/deps.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

test: deps vet
	BS3_GUEST_TESTS=1 $(GO) test -race -count=1 -timeout 40m ./...

# The demo: a 4 GiB device on the embedded dir store under ./data, through
# FUSE + a loop device. Needs root (FUSE mount, loop device).
run: bs3
	mkdir -p data
	./bs3 -c contrib/demo.toml

# The longer crash-point job: 1,000 random crash points over random
# workloads (make test runs the exhaustive small scenarios).
crashpoints:
	BS3_CRASHPOINT_SEEDS=1000 $(GO) test -race -count=1 -timeout 60m -run '^TestCrashPointRandom$$' -v ./internal/crashtest/

bench: deps bs3
	$(GO) test -run '^$$' -bench . -benchtime 1x -timeout 60m ./internal/bench/

install: bs3
	install -D -m 0755 bs3 $(DESTDIR)$(PREFIX)/bin/bs3
	@if [ -e $(DESTDIR)/etc/bs3/config.toml ]; then echo "keeping existing /etc/bs3/config.toml"; \
	else install -D -m 0600 config.toml $(DESTDIR)/etc/bs3/config.toml; fi
	install -D -m 0644 contrib/systemd/bs3.service $(DESTDIR)$(SYSTEMD)/bs3.service
	install -D -m 0644 contrib/systemd/bs3-gc.service $(DESTDIR)$(SYSTEMD)/bs3-gc.service
	install -D -m 0644 contrib/systemd/bs3-gc.timer $(DESTDIR)$(SYSTEMD)/bs3-gc.timer
	install -D -m 0644 README.md $(DESTDIR)$(PREFIX)/share/doc/bs3/README.md
	@echo "installed; edit /etc/bs3/config.toml, then: systemctl daemon-reload && systemctl enable --now bs3 bs3-gc.timer"

clean:
	rm -f bs3

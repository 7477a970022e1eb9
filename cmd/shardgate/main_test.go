package main

import (
	"strings"
	"testing"
)

func TestIsLoopback(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
		err  bool
	}{
		{"127.0.0.1:7070", true, false},
		{"127.9.9.9:1", true, false},
		{"[::1]:7070", true, false},
		{"localhost:7070", true, false},
		{":7070", false, false},
		{"0.0.0.0:7070", false, false},
		{"10.1.2.3:7070", false, false},
		{"example.com:7070", false, false},
		{"127.0.0.1", false, true},
	} {
		got, err := isLoopback(tc.addr)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("isLoopback(%q) = %v, %v; want %v, err=%v", tc.addr, got, err, tc.want, tc.err)
		}
	}
}

func TestParseShardSpecs(t *testing.T) {
	specs, err := parseShardSpecs([]string{"a=postgres://u:pw@h/db?x=1", "b-2=postgres://h/db2"})
	if err != nil || len(specs) != 2 || specs[0].Name != "a" || specs[0].DSN != "postgres://u:pw@h/db?x=1" {
		t.Fatalf("parseShardSpecs = %+v, %v", specs, err)
	}
	for _, bad := range []string{"", "a", "=dsn", "a=", "Bad=dsn"} {
		_, err := parseShardSpecs([]string{bad})
		if err == nil {
			t.Errorf("parseShardSpecs(%q) accepted", bad)
		} else if strings.Contains(err.Error(), "pw") {
			t.Errorf("error echoes the DSN: %v", err)
		}
	}
	if _, err := parseShardSpecs([]string{"a=postgres://u:secretpw@h/db", "a b=postgres://u:secretpw@h/db"}); err == nil || strings.Contains(err.Error(), "secretpw") {
		t.Errorf("bad name with a password in the DSN: %v", err)
	}
}

func TestWithDatabase(t *testing.T) {
	got, err := withDatabase("postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable", "x_catalog")
	if err != nil || got != "postgres://postgres@127.0.0.1:5432/x_catalog?sslmode=disable" {
		t.Fatalf("withDatabase = %q, %v", got, err)
	}
	if _, err := withDatabase("host=localhost dbname=x", "y"); err == nil {
		t.Fatal("a keyword/value DSN was accepted")
	}
}

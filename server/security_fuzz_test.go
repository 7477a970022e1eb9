package server

import (
	"context"
	"strings"
	"testing"
	"time"
)

func FuzzParseBearer(f *testing.F) {
	for _, s := range []string{"Bearer abc.def.ghi", "bearer x", "Bearer  x", "Bearer", "Basic abc", "Bearer a b", "Bearer \x00", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, h string) {
		tok, ok := parseBearer(h)
		if !ok {
			return
		}
		if tok == "" || strings.ContainsAny(tok, " \t\r\n") || len(tok) > maxBearer {
			t.Fatalf("parseBearer(%q) = %q", h, tok)
		}
		if again, ok := parseBearer("Bearer " + tok); !ok || again != tok {
			t.Fatalf("round trip of %q: %q %v", tok, again, ok)
		}
	})
}

func FuzzPrincipalFromClaims(f *testing.F) {
	for _, s := range [][2]string{{"user", "alice"}, {"admin", "ops"}, {"service", "svc:a@b"}, {"root", "x"}, {"user", ""}, {"user", "a b"}, {"", "x"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, role, sub string) {
		c := &Claims{Role: role}
		c.Subject = sub
		p, err := principalFromClaims(c)
		if err != nil {
			return
		}
		switch p.Role {
		case RoleUser, RoleService, RoleAdmin:
		default:
			t.Fatalf("role %q accepted", role)
		}
		if validateUserID("sub", p.Subject) != nil || p.Anonymous || p.key != role+":"+sub {
			t.Fatalf("principal %+v from %q/%q", p, role, sub)
		}
	})
}

// FuzzVerifyToken feeds arbitrary strings to the JWT verifier: it must
// never panic, and never accept anything but the one token signed with
// the trusted key (or a re-encoding of it).
func FuzzVerifyToken(f *testing.F) {
	keys := newTestKeys(f)
	v := keys.verifier(f)
	good := keys.token(f, "admin", "ops")
	f.Add(good)
	for _, tok := range keys.badTokens(f) {
		f.Add(tok)
	}
	f.Add("eyJhbGciOiJub25lIn0.e30.")
	f.Add("a.b.c")
	f.Fuzz(func(t *testing.T, raw string) {
		v.now = time.Now
		p, err := v.Verify(context.Background(), raw)
		if err != nil {
			return
		}
		if p.Role != RoleAdmin || p.Subject != "ops" {
			t.Fatalf("accepted %q as %+v", raw, p)
		}
	})
}

// FuzzConfigSchema compiles arbitrary schemas and checks arbitrary values
// against the ones that compile: no panics, and every refusal names a JSON
// pointer.
func FuzzConfigSchema(f *testing.F) {
	f.Add(limitsSchema, `{"max": 1}`)
	f.Add(limitsSchema, `{"max": "x", "tags": [1]}`)
	f.Add(`{"type":"array","items":{"pattern":"^a+$"}}`, `["aaa","b"]`)
	f.Add(`{"$ref":"#/$defs/x","$defs":{"x":{"type":"string"}}}`, `1`)
	f.Add(`{"properties":{"a/b~c":{"const":1}}}`, `{"a/b~c":2}`)
	f.Add(`{"$ref":"file:///etc/passwd"}`, `1`)
	f.Fuzz(func(t *testing.T, schema, value string) {
		if len(schema) > 4096 || len(value) > 4096 {
			return
		}
		sch, err := compileSchema(schema)
		if err != nil {
			return
		}
		if validateJSON("value_json", value, false, 1<<16) != nil {
			return
		}
		if err := checkValue(sch, "value_json", storedJSON(value, false)); err != nil {
			if !strings.HasPrefix(err.Error(), `value_json: at "`) {
				t.Fatalf("refusal without a path: %v", err)
			}
		}
	})
}

func FuzzParseRates(f *testing.F) {
	for _, s := range []string{"read=1000/2000,write=200/400,admin=20/40,watch=10/20", "read=0.5", "read=1/0", "x=1", ""} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		rates, err := ParseRates(s)
		if err != nil {
			return
		}
		for c, r := range rates {
			if r.PerSecond <= 0 || r.Burst < 1 {
				t.Fatalf("%q: class %s got %+v", s, c, r)
			}
			if interval, tol := gcraParams(r); interval < 1 || tol < interval {
				t.Fatalf("%q: GCRA params %d %d", s, interval, tol)
			}
		}
	})
}

func FuzzParseKeys(f *testing.F) {
	keys := newTestKeys(f)
	f.Add(keys.rsaPEM)
	f.Add([]byte(`{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}`))
	f.Add([]byte(`{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}`))
	f.Add([]byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		ks, err := ParseKeys(data)
		if err != nil {
			return
		}
		for kid, k := range ks {
			switch k.Alg {
			case "EdDSA", "RS256", "ES256":
			default:
				t.Fatalf("key %q pinned to %q", kid, k.Alg)
			}
		}
	})
}

package auth

import (
	"regexp"
	"strings"
	"testing"
)

// userID is the API's rule for a user_id, which every accepted subject
// must follow.
var userID = regexp.MustCompile(`^[A-Za-z0-9._:@-]{1,128}$`)

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
		if !userID.MatchString(p.Subject) || p.Anonymous || p.key != role+":"+sub {
			t.Fatalf("principal %+v from %q/%q", p, role, sub)
		}
	})
}

package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/shardgate/shardgate/auth/keyset"
)

// bearerCreds sends a token as "authorization: Bearer …" on every call.
type bearerCreds struct {
	token      string
	requireTLS bool
}

func (b bearerCreds) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity makes gRPC refuse to send the token over a
// plaintext connection, except to loopback.
func (b bearerCreds) RequireTransportSecurity() bool { return b.requireTLS }

// isLoopbackAddr reports whether a dial address is a loopback one.
func isLoopbackAddr(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// dialOptions builds the transport and per-call credentials from the flags.
func (g *globals) dialOptions() ([]grpc.DialOption, error) {
	useTLS := g.TLS || g.CAFile != "" || g.Cert != ""
	loopback := isLoopbackAddr(g.Addr)
	var opts []grpc.DialOption
	if useTLS {
		conf := &tls.Config{MinVersion: tls.VersionTLS13, ServerName: g.ServerName}
		if g.CAFile != "" {
			pemBytes, err := os.ReadFile(g.CAFile)
			if err != nil {
				return nil, err
			}
			conf.RootCAs = x509.NewCertPool()
			if !conf.RootCAs.AppendCertsFromPEM(pemBytes) {
				return nil, fmt.Errorf("--ca-file %s: no certificates", g.CAFile)
			}
		}
		if g.Cert != "" {
			c, err := tls.LoadX509KeyPair(g.Cert, g.Key)
			if err != nil {
				return nil, fmt.Errorf("--client-cert/--client-key: %w", err)
			}
			conf.Certificates = []tls.Certificate{c}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(conf)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if g.Token != "" {
		if !useTLS && !loopback {
			return nil, fmt.Errorf("refusing to send a token in plaintext to %s: pass --tls (and --ca-file), or talk to a loopback address", g.Addr)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(bearerCreds{token: g.Token, requireTLS: !loopback}))
	}
	return opts, nil
}

type tokenMintCmd struct {
	Role string        `help:"Role claim: user, service or admin." enum:"user,service,admin" required:""`
	Sub  string        `help:"Subject: for role user, the user_id the token may act for." required:""`
	TTL  time.Duration `help:"Lifetime of the token." default:"1h"`
	Key  string        `help:"PEM private key (PKCS#8: Ed25519, RSA or P-256) to sign with, e.g. the one shardgate dev prints." required:"" type:"existingfile"`
	Iss  string        `help:"Issuer claim (iss), if the server requires one."`
	Aud  string        `help:"Audience claim (aud), if the server requires one."`
}

// Run prints a signed token; the key's keyset.KeyID goes into its "kid" header.
func (c tokenMintCmd) Run(g *globals) error {
	b, err := os.ReadFile(c.Key)
	if err != nil {
		return err
	}
	tok, err := mintToken(b, c.Role, c.Sub, c.Iss, c.Aud, c.TTL, time.Now())
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(g.out, tok)
	return err
}

func mintToken(keyPEM []byte, role, sub, iss, aud string, ttl time.Duration, now time.Time) (string, error) {
	block, _ := pem.Decode(keyPEM)
	if block == nil || block.Type != "PRIVATE KEY" {
		return "", errors.New("key file is not a PEM PKCS#8 private key")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return "", err
	}
	var method jwt.SigningMethod
	switch k.(type) {
	case ed25519.PrivateKey:
		method = jwt.SigningMethodEdDSA
	case *rsa.PrivateKey:
		method = jwt.SigningMethodRS256
	case *ecdsa.PrivateKey:
		method = jwt.SigningMethodES256
	default:
		return "", fmt.Errorf("unsupported key type %T", k)
	}
	if ttl <= 0 {
		return "", errors.New("--ttl must be positive")
	}
	claims := jwt.MapClaims{"role": role, "sub": sub, "iat": now.Unix(), "exp": now.Add(ttl).Unix()}
	if iss != "" {
		claims["iss"] = iss
	}
	if aud != "" {
		claims["aud"] = aud
	}
	t := jwt.NewWithClaims(method, claims)
	kid, err := keyset.KeyID(k.(crypto.Signer).Public())
	if err != nil {
		return "", err
	}
	t.Header["kid"] = kid
	return t.SignedString(k)
}

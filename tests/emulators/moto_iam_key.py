"""Make an IAM user allowed everything, with an access key, on a moto started with
INITIAL_NO_AUTH_ACTION_COUNT=3, spending exactly those three unchecked requests.
Prints "<access key id> <secret access key>".

Usage: python3 moto_iam_key.py http://127.0.0.1:PORT
"""

import re
import sys
import urllib.parse
import urllib.request

URL = sys.argv[1] + "/"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
POLICY = '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}'


def iam(**params):
    body = urllib.parse.urlencode({"Version": "2010-05-08", **params}).encode()
    request = urllib.request.Request(
        URL,
        data=body,
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            # moto routes a request by its credential scope; these few are not checked.
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDSETUP/20260101/us-east-1/iam/aws4_request, "
            "SignedHeaders=host, Signature=0",
        },
    )
    with OPENER.open(request, timeout=30) as response:
        return response.read().decode()


iam(Action="CreateUser", UserName="conductor-tests")
iam(Action="PutUserPolicy", UserName="conductor-tests", PolicyName="all", PolicyDocument=POLICY)
created = iam(Action="CreateAccessKey", UserName="conductor-tests")
key = re.search(r"<AccessKeyId>([^<]+)</AccessKeyId>", created).group(1)
secret = re.search(r"<SecretAccessKey>([^<]+)</SecretAccessKey>", created).group(1)
print(key, secret)

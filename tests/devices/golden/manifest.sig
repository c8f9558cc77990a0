{
  "signatures": [
    {
      "keyid": "56475aa75463474c0285df5dbf2bcab73da651358839e9b77481b2eab107708c",
      "scheme": "ed25519",
      "sig": "t1mGMHr6R8YHzKXqrFhXBeDDD2mzFfVs+0OjsExsVeKOKZHHf4Aw4NpcnljTiukbC8YcMRVuimR3RS6NpKekBg=="
    }
  ]
}
